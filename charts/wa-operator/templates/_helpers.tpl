{{/*
Names. Objects of the release are `<fullname>` (operator) and `<fullname>-gateway`; both are
kept to 63 characters because Service and label values must be DNS labels.
*/}}
{{- define "wa.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wa.fullname" -}}
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

{{- define "wa.operator.fullname" -}}
{{- include "wa.fullname" . }}
{{- end }}

{{- define "wa.gateway.fullname" -}}
{{- printf "%s-gateway" (include "wa.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "wa.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "wa.labels" -}}
helm.sh/chart: {{ include "wa.chart" . }}
app.kubernetes.io/name: {{ include "wa.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wa-operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels; `component` is operator or gateway. Never change these: selectors are immutable. */}}
{{- define "wa.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wa.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "wa.componentLabels" -}}
{{ include "wa.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The namespaces sessions live in: `watchNamespaces`, or the release namespace. Returned as
a JSON list because templates can only return strings.
*/}}
{{- define "wa.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- .Values.watchNamespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/* `repository:tag` or `repository@digest`; the tag defaults to the chart's appVersion. */}}
{{- define "wa.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "wa.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "wa.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "wa.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "wa.gateway.fullname" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- required "gateway.serviceAccount.name is required when gateway.serviceAccount.create is false" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The gateway's in-cluster base URL; the operator gives pods `<this>/internal/v1/events`. */}}
{{- define "wa.gateway.url" -}}
{{- printf "http://%s.%s.svc:%v" (include "wa.gateway.fullname" .) .Release.Namespace .Values.gateway.service.port }}
{{- end }}

{{/*
Refuses value combinations a JSON schema cannot express clearly. Included by every
template that depends on them, so `helm template` and `helm install` both fail early.
*/}}
{{- define "wa.validate" -}}
{{- if and (eq .Values.gateway.database.type "sqlite") (gt (int .Values.gateway.replicas) 1) }}
{{- fail (printf "gateway.replicas is %v, but gateway.database.type is sqlite: an SQLite file on a ReadWriteOnce volume serves exactly one gateway. Set gateway.replicas=1, or use PostgreSQL (gateway.database.type=postgresql with gateway.database.postgresql.existingSecret) to run several replicas." .Values.gateway.replicas) }}
{{- end }}
{{- if and (eq .Values.gateway.database.type "postgresql") (not .Values.gateway.database.postgresql.existingSecret) }}
{{- fail "gateway.database.type is postgresql, but gateway.database.postgresql.existingSecret is empty: name a Secret whose key (gateway.database.postgresql.secretKey) holds the PostgreSQL URL." }}
{{- end }}
{{- if gt (len (include "wa.watchNamespaces" . | fromJsonArray)) 1 }}
{{- fail (printf "watchNamespaces lists %d namespaces (%s), but wa-operator and wa-gateway %s watch exactly one namespace each (their --namespace flag). Install one release per namespace, or list one namespace." (len .Values.watchNamespaces) (join ", " .Values.watchNamespaces) .Chart.AppVersion) }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled }}
{{- fail "metrics.serviceMonitor.enabled and metrics.podMonitor.enabled are both true: Prometheus would scrape the operator and the gateway twice. Enable one of them." }}
{{- end }}
{{- end }}

{{/* Pod security context shared by the operator and the gateway (UID/GID of the images). */}}
{{- define "wa.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "wa.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}
