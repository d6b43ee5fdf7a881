{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "sluice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name used as the prefix of every object. Truncated to 63 characters
because some fields (e.g. label values) are limited to that by the DNS spec.
*/}}
{{- define "sluice.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Namespace of the namespaced objects.
*/}}
{{- define "sluice.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride }}
{{- end }}

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "sluice.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the proxy's pods. They are part of the DaemonSet's
immutable selector: never add anything here that may change on upgrade.
*/}}
{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Standard labels of every object.
*/}}
{{- define "sluice.labels" -}}
helm.sh/chart: {{ include "sluice.chart" . }}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sluice
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Name of the ServiceAccount the proxy runs as.
*/}}
{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sluice.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: repository@digest when a digest is set, else repository:tag.
*/}}
{{- define "sluice.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
"host:port" for a listen flag, with IPv6 addresses in brackets.
Usage: include "sluice.hostPort" (list .Values.admin.address .Values.admin.port)
*/}}
{{- define "sluice.hostPort" -}}
{{- $host := index . 0 | toString }}
{{- $port := index . 1 | int }}
{{- if and (contains ":" $host) (not (hasPrefix "[" $host)) }}
{{- printf "[%s]:%d" $host $port }}
{{- else }}
{{- printf "%s:%d" $host $port }}
{{- end }}
{{- end }}

{{/*
Address the kubelet probes. A wildcard listen address is probed on the
matching loopback address; any other address is probed as is.
*/}}
{{- define "sluice.probeHost" -}}
{{- $host := .Values.health.address | toString | trimPrefix "[" | trimSuffix "]" }}
{{- if eq $host "0.0.0.0" }}127.0.0.1
{{- else if eq $host "::" }}::1
{{- else }}{{ $host }}
{{- end }}
{{- end }}

{{/*
Fast-path mode as one of auto/on/off. An unquoted `on`/`off` in a YAML values
file arrives as a boolean (YAML 1.1), so booleans are accepted too.
*/}}
{{- define "sluice.fastPathMode" -}}
{{- $m := .Values.fastPath.mode }}
{{- if kindIs "bool" $m }}{{ ternary "on" "off" $m }}
{{- else }}{{ $m | toString }}
{{- end }}
{{- end }}

{{/*
True (non-empty) when the eBPF fast path may be loaded.
*/}}
{{- define "sluice.fastPathEnabled" -}}
{{- if ne (include "sluice.fastPathMode" .) "off" }}true{{ end }}
{{- end }}

{{/*
Where the host's cgroup2 root is mounted inside the container. Kept apart
from /sys/fs/cgroup, which the runtime mounts with the pod's own cgroup
namespace view: the proxy uses that one to learn its own cgroup id.
*/}}
{{- define "sluice.cgroupMountPath" -}}
/run/sluice/cgroupv2
{{- end }}

{{/*
Container arguments of `sluice run --kubernetes`, one flag=value per element.
*/}}
{{- define "sluice.args" -}}
- run
- --kubernetes
- --node-name=$(NODE_NAME)
{{- range .Values.secrets.namespaces | uniq }}
- {{ printf "--secrets-namespace=%s" . | quote }}
{{- end }}
- {{ printf "--admin-address=%s" (include "sluice.hostPort" (list .Values.admin.address .Values.admin.port)) | quote }}
- {{ printf "--health-address=%s" (include "sluice.hostPort" (list .Values.health.address .Values.health.port)) | quote }}
- {{ printf "--metrics-address=%s" (include "sluice.hostPort" (list .Values.metrics.address .Values.metrics.port)) | quote }}
- {{ printf "--fast-path=%s" (include "sluice.fastPathMode" .) | quote }}
{{- if include "sluice.fastPathEnabled" . }}
- {{ printf "--fast-path-cgroup=%s" (include "sluice.cgroupMountPath" .) | quote }}
{{- end }}
{{- if gt (int .Values.proxy.workers) 0 }}
- {{ printf "--workers=%d" (int .Values.proxy.workers) | quote }}
{{- end }}
- {{ printf "--proxy-port-range=%s" .Values.proxy.proxyPortRange | quote }}
{{- with .Values.tracing.otlp.endpoint }}
- {{ printf "--otlp-endpoint=%s" . | quote }}
- {{ printf "--otlp-protocol=%s" $.Values.tracing.otlp.protocol | quote }}
- {{ printf "--trace-sampling=%v" $.Values.tracing.sampling | quote }}
{{- end }}
- {{ printf "--log-level=%s" .Values.proxy.logLevel | quote }}
- {{ printf "--log-format=%s" .Values.proxy.logFormat | quote }}
{{- range .Values.proxy.extraArgs }}
- {{ . | toString | quote }}
{{- end }}
{{- end }}

{{/*
Security context of the proxy container.

Fast path off: non-root (distroless "nonroot", 65532), no capabilities,
no privilege escalation. The proxy's ports are all above 1024.

Fast path on/auto: root, because Kubernetes grants added capabilities to
root only (no ambient capabilities for other users), with every capability
dropped except fastPath.capabilities. allowPrivilegeEscalation is left
unset when SYS_ADMIN is added: the API server treats SYS_ADMIN as a
privilege escalation and rejects the combination.

.Values.securityContext is merged over the result.
*/}}
{{- define "sluice.securityContext" -}}
{{- $sc := dict
  "readOnlyRootFilesystem" true
  "seccompProfile" (dict "type" "RuntimeDefault")
}}
{{- if include "sluice.fastPathEnabled" . }}
{{- $caps := .Values.fastPath.capabilities | default list }}
{{- $_ := set $sc "runAsNonRoot" false }}
{{- $_ := set $sc "runAsUser" 0 }}
{{- $_ := set $sc "runAsGroup" 0 }}
{{- $_ := set $sc "capabilities" (dict "drop" (list "ALL") "add" $caps) }}
{{- if not (or (has "SYS_ADMIN" $caps) (has "CAP_SYS_ADMIN" $caps)) }}
{{- $_ := set $sc "allowPrivilegeEscalation" false }}
{{- end }}
{{- else }}
{{- $_ := set $sc "runAsNonRoot" true }}
{{- $_ := set $sc "runAsUser" 65532 }}
{{- $_ := set $sc "runAsGroup" 65532 }}
{{- $_ := set $sc "allowPrivilegeEscalation" false }}
{{- $_ := set $sc "capabilities" (dict "drop" (list "ALL")) }}
{{- end }}
{{- toYaml (mergeOverwrite $sc (deepCopy .Values.securityContext)) }}
{{- end }}
