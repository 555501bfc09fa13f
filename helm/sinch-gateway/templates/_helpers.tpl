{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "sinch-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release alone when it already contains the chart name. */}}
{{- define "sinch-gateway.fullname" -}}
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

{{- define "sinch-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sinch-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sinch-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sinch-gateway.labels" -}}
helm.sh/chart: {{ include "sinch-gateway.chart" . }}
{{ include "sinch-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "sinch-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sinch-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sinch-gateway.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where the Secret's keys are mounted; each becomes GATEWAY_<NAME>_FILE. */}}
{{- define "sinch-gateway.secretDir" -}}/var/run/secrets/sinch-gateway{{- end }}
{{- define "sinch-gateway.configDir" -}}/etc/sinch-gateway{{- end }}

{{/* The service port the webhook is reached on: its own port when configured. */}}
{{- define "sinch-gateway.webhookPortName" -}}
{{- if .Values.ports.webhook }}webhook{{ else }}http{{ end }}
{{- end }}

{{/*
Render-time checks the schema cannot express.
- The pod must get SIGKILL only after the gateway's drain deadline, with 5 s
  left to commit offsets and flush the producer.
- The webhook port must differ from the admin port.
*/}}
{{- define "sinch-gateway.validate" -}}
{{- $drain := default 20 .Values.config.shutdown_timeout_s | float64 }}
{{- $grace := .Values.terminationGracePeriodSeconds | float64 }}
{{- if lt $grace (addf $drain 5) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be at least config.shutdown_timeout_s (%v) + 5" .Values.terminationGracePeriodSeconds $drain) }}
{{- end }}
{{- if and .Values.ports.webhook (eq (int .Values.ports.webhook) (int .Values.ports.http)) }}
{{- fail "ports.webhook must differ from ports.http (or be null to share the admin port)" }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.external.urlKey }}
{{- fail "redis.enabled and redis.external.urlKey both set: choose the in-chart Redis or an external one" }}
{{- end }}
{{- end }}

{{/* The in-chart Redis (redis.enabled): its Deployment and Service. */}}
{{- define "sinch-gateway.redisName" -}}
{{- printf "%s-redis" (include "sinch-gateway.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "sinch-gateway.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "sinch-gateway.name" . }}-redis
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sinch-gateway.redisLabels" -}}
helm.sh/chart: {{ include "sinch-gateway.chart" . }}
{{ include "sinch-gateway.redisSelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.redis.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: limiter
app.kubernetes.io/part-of: {{ include "sinch-gateway.name" . }}
{{- end }}

{{/* The Secret holding the external Redis URL: its own, or the chart's existingSecret. */}}
{{- define "sinch-gateway.redisSecret" -}}
{{- default .Values.secrets.existingSecret .Values.redis.external.existingSecret }}
{{- end }}

{{/*
One TOML value. Helm reads every YAML number as a float64; whole numbers are
written as integers, so that the file reads as the values were written (not
6.7108864e+07). The gateway's float settings take integers as they are.
*/}}
{{- define "sinch-gateway.tomlValue" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) }}
{{- if eq (float64 (int64 .)) (float64 .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}{{ fail (printf "config: cannot write %v (%s) to TOML" . (kindOf .)) }}
{{- end }}
{{- end }}

{{/*
.Values.config as TOML: scalar keys first, then one [table] per map
(channel_rates) and one [apps.ID] table per app.
*/}}
{{- define "sinch-gateway.toml" -}}
{{- $config := .Values.config }}
{{- range $key := keys $config | sortAlpha }}
{{- $value := get $config $key }}
{{- if not (kindIs "map" $value) }}
{{ $key }} = {{ include "sinch-gateway.tomlValue" $value }}
{{- end }}
{{- end }}
{{- range $key := keys $config | sortAlpha }}
{{- $table := get $config $key }}
{{- if and (kindIs "map" $table) (ne $key "apps") }}

[{{ $key }}]
{{- range $name := keys $table | sortAlpha }}
{{ $name | toJson }} = {{ include "sinch-gateway.tomlValue" (get $table $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $app := keys ($config.apps | default dict) | sortAlpha }}
{{- $settings := get $config.apps $app }}

[apps.{{ $app | toJson }}]
{{- range $name := keys $settings | sortAlpha }}
{{ $name }} = {{ include "sinch-gateway.tomlValue" (get $settings $name) }}
{{- end }}
{{- end }}
{{- end }}
