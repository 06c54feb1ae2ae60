{{- define "rolemesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "rolemesh.labels" -}}
app.kubernetes.io/name: rolemesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: rolemesh
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "rolemesh.image" -}}
{{- if .image.digest -}}
{{ .image.repository }}@{{ .image.digest }}
{{- else -}}
{{ .image.repository }}:{{ .image.tag | default .appVersion }}
{{- end -}}
{{- end -}}

{{- define "rolemesh.controllerServiceAccount" -}}
{{- .Values.controller.serviceAccount.name | default (printf "%s-controller" (include "rolemesh.fullname" .)) -}}
{{- end -}}

{{- define "rolemesh.webhookName" -}}
{{- printf "%s-webhook" (include "rolemesh.fullname" .) -}}
{{- end -}}
