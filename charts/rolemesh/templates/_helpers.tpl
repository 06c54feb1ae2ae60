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

{{/* The pod template's metadata extras, scheduling and priority, shared by the controller and the
webhook: (dict "root" . "component" "controller" "values" .Values.controller). */}}
{{- define "rolemesh.podLabels" -}}
{{- with .values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "rolemesh.podAnnotations" -}}
{{- with .values.podAnnotations }}
annotations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "rolemesh.podScheduling" -}}
{{- $priority := .root.Values.priorityClassName | default (dig "priorityClassName" "" (.root.Values.global | default dict)) -}}
{{- with $priority }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .values.topologySpreadConstraints }}
topologySpreadConstraints:
{{- range .values.topologySpreadConstraints }}
  - {{- toYaml (merge (deepCopy .) (dict "labelSelector" (dict "matchLabels" (dict "app.kubernetes.io/instance" $.root.Release.Name "app.kubernetes.io/component" $.component)))) | nindent 4 }}
{{- end }}
{{- end }}
{{- end -}}

{{/* RUST_LOG and the log format, for the controller and the webhook. */}}
{{- define "rolemesh.logEnv" -}}
- {name: RUST_LOG, value: {{ .Values.logLevel | quote }}}
- {name: ROLEMESH_LOG_FORMAT, value: {{ .Values.logFormat | quote }}}
{{- end -}}

{{/* A PodDisruptionBudget for a component, only when it has more than one replica: with one, any
budget that keeps a pod blocks every node drain. */}}
{{- define "rolemesh.pdb" -}}
{{- if and .values.podDisruptionBudget.enabled (gt (int .values.replicas) 1) }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "rolemesh.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- if hasKey .values.podDisruptionBudget "maxUnavailable" }}
  maxUnavailable: {{ .values.podDisruptionBudget.maxUnavailable }}
  {{- else }}
  minAvailable: {{ .values.podDisruptionBudget.minAvailable }}
  {{- end }}
  selector:
    matchLabels:
      app.kubernetes.io/instance: {{ .root.Release.Name }}
      app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}
