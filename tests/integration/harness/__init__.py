"""Reusable integration-test harness: a real registry, image builders and real clients.

Modules:

* :mod:`.tools` -- ``require_tool``, ``free_port``.
* :mod:`.registry` -- ``RealRegistry``, a ``docker-registry`` process whose access log
  is parsed to count the requests it served.
* :mod:`.images` -- deterministic OCI images and indexes, pushing them with skopeo,
  reading back what a registry holds, streaming large blobs.
* :mod:`.clients` -- skopeo, podman and containerd/ctr configured to pull through a mirror.
* :mod:`.process` -- background daemons that cannot outlive the test process.
* :mod:`.httpclient` -- a small ``http.client`` wrapper (streams request bodies).
"""
