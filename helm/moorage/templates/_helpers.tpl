{{- define "moorage.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "moorage.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "moorage.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moorage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The name of the pod's, and the Service's, one port: what it speaks, for meshes and
controllers that read the protocol from the name. */}}
{{- define "moorage.portName" -}}
{{- ternary "https" "http" .Values.tls.enabled -}}
{{- end -}}

{{- define "moorage.labels" -}}
{{ include "moorage.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The settings file the pod reads; upstream passwords are files from Secrets. */}}
{{- define "moorage.config" -}}
listen: ":5000"
storage:
  path: /var/lib/moorage
  max_size: {{ include "moorage.maxSize" . | quote }}
tag_ttl: {{ include "moorage.number" .Values.config.tagTtl | quote }}
tags_list_ttl: {{ include "moorage.number" .Values.config.tagsListTtl | quote }}
referrers_ttl: {{ include "moorage.number" .Values.config.referrersTtl | quote }}
log_level: {{ .Values.config.logLevel }}
log_format: json
shutdown_delay: {{ include "moorage.number" .Values.config.shutdownDelay | quote }}
shutdown_timeout: {{ include "moorage.number" .Values.config.shutdownTimeout | quote }}
{{- with .Values.metrics.port }}
metrics_listen: {{ printf ":%d" (int .) | quote }}
{{- end }}
{{- if or .Values.auth.htpasswdSecret .Values.auth.tokenSigningKeySecret .Values.auth.anonymous .Values.auth.groups .Values.auth.policy .Values.auth.tokenRealm }}
auth:
  {{- if .Values.auth.htpasswdSecret }}
  htpasswd_file: /etc/moorage/auth/htpasswd
  {{- end }}
  {{- if .Values.auth.tokenSigningKeySecret }}
  token_signing_key_file: /etc/moorage/token-key/token-key.pem
  {{- else if and .Values.auth.htpasswdSecret (gt (int .Values.replicaCount) 1) }}
  {{- fail "auth.tokenSigningKeySecret: required with auth.htpasswdSecret and more than one replica (replicaCount): every replica must sign tokens with one key, or a token one replica issued is refused by the others part-way through a pull (see values.yaml)" }}
  {{- end }}
  {{- if .Values.auth.groups }}
  groups_file: /etc/moorage/settings/groups
  {{- end }}
  {{- with .Values.auth.anonymous }}
  anonymous: {{ . }}
  {{- end }}
  {{- with .Values.auth.policy }}
  policy: {{ toJson . }}
  {{- end }}
  {{- with .Values.auth.tokenRealm }}
  token_realm: {{ . | quote }}
  {{- end }}
{{- end }}
{{- if .Values.tls.enabled }}
tls:
  cert_file: /etc/moorage/tls/tls.crt
  key_file: /etc/moorage/tls/tls.key
{{- end }}
{{- with .Values.upstreams }}
upstreams:
{{- range $i, $_ := . }}
  - host: {{ .host | quote }}
    url: {{ .url | quote }}
    {{- if .default }}
    default: true
    {{- end }}
    {{- with .aliases }}
    aliases: {{ toJson . }}
    {{- end }}
    {{- with .prefixes }}
    prefixes: {{ toJson . }}
    {{- end }}
    {{- if hasKey . "tagTtl" }}
    tag_ttl: {{ include "moorage.number" .tagTtl | quote }}
    {{- end }}
    {{- if hasKey . "prefetchBlobs" }}
    prefetch_blobs: {{ .prefetchBlobs }}
    {{- end }}
    {{- with .username }}
    username: {{ . | quote }}
    {{- end }}
    {{- if .passwordSecret }}
    password_file: {{ printf "/etc/moorage/credentials/%d/password" $i | quote }}
    {{- end }}
    {{- if .caConfigMap }}
    ca_file: {{ printf "/etc/moorage/ca/%d/ca.crt" $i | quote }}
    {{- end }}
    {{- $host := .host }}
    {{- $aliases := .aliases | default list }}
    {{- if .lifecyclePolicy }}
    lifecycle_policy_file: {{ printf "/etc/moorage/settings/%s" (include "moorage.lifecycleFile" (list $host "all")) | quote }}
    {{- end }}
    {{- with .lifecyclePolicies }}
    lifecycle_policies:
    {{- range $i, $binding := . }}
    {{- /* As the settings refuse them at the pod's start: globs that can never match. */}}
    {{- range $name := prepend $aliases $host }}
    {{- if and (regexMatch "[.:]" $name) (hasPrefix (printf "%s/" $name) $binding.repositories) }}
    {{- fail (printf "upstreams: %s: lifecyclePolicies[%d].repositories %q names the upstream's host; the globs are over its repository names alone" $host $i $binding.repositories) }}
    {{- end }}
    {{- end }}
    {{- if and (eq $host "docker.io") (not (contains "/" $binding.repositories)) (not (regexMatch "^[*?\\[]" $binding.repositories)) }}
    {{- fail (printf "upstreams: docker.io: lifecyclePolicies[%d].repositories %q can never match: one-component names are stored as library/<name>" $i $binding.repositories) }}
    {{- end }}
      - repositories: {{ $binding.repositories | quote }}
        policy_file: {{ printf "/etc/moorage/settings/%s" (include "moorage.lifecycleFile" (list $host $i)) | quote }}
    {{- end }}
    {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* storage.max_size: persistence.maxSize, or 85 % of the volume in MiB, so that the cache
     evicts before its volume is full (the process is no root: the file system's reserved
     blocks, 5 % on ext4, are not its own, and the index and temporaries need room besides). */}}
{{/* A value as the settings take it: a string as it is; a number never in exponent form
(values files give floats, which toString writes as 5e+10). */}}
{{- define "moorage.number" -}}
{{- if kindIs "string" . -}}
{{- . -}}
{{- else if eq (float64 .) (floor (float64 .)) -}}
{{- printf "%.0f" (float64 .) -}}
{{- else -}}
{{- printf "%f" (float64 .) | trimSuffix "0" | trimSuffix "0" | trimSuffix "0" -}}
{{- end -}}
{{- end -}}

{{- define "moorage.maxSize" -}}
{{- $max := .Values.persistence.maxSize -}}
{{- /* a number counts as given, 0 (--set persistence.maxSize=0: no cap) too */}}
{{- if or (and (not (kindIs "invalid" $max)) (not (kindIs "string" $max))) (ne (toString $max) "") -}}
{{- include "moorage.number" $max -}}
{{- else -}}
{{- $size := toString .Values.persistence.size -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $size -}}
{{- $factors := dict "" 1.0 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 -}}
{{- $bytes := mulf (float64 $number) (get $factors (trimPrefix $number $size)) -}}
{{- printf "%dMiB" (int64 (floor (divf (mulf $bytes 0.85) 1048576.0))) -}}
{{- end -}}
{{- end -}}

{{/* The name of a lifecycle policy file in the settings ConfigMap: (list host index). */}}
{{- define "moorage.lifecycleFile" -}}
{{- printf "lifecycle-%s-%v.json" (index . 0 | replace ":" "-") (index . 1) -}}
{{- end -}}

{{/* Files beside config.yaml, mounted at /etc/moorage/settings: the groups file and the
     upstreams' lifecycle policies (ECR's JSON), which Moorage reads again when they change. */}}
{{- define "moorage.settingsFiles" -}}
{{- with .Values.auth.groups }}
groups: |
  {{- range $group, $users := . }}
  {{ $group }}: {{ join " " $users }}
  {{- end }}
{{- end }}
{{- range .Values.upstreams }}
{{- $host := .host }}
{{- with .lifecyclePolicy }}
{{ include "moorage.lifecycleFile" (list $host "all") }}: {{ toJson . | quote }}
{{- end }}
{{- range $i, $binding := .lifecyclePolicies }}
{{ include "moorage.lifecycleFile" (list $host $i) }}: {{ toJson $binding.policy | quote }}
{{- end }}
{{- end }}
{{- end -}}
