{{/* Names and labels shared by every template. */}}
{{- define "cloudpass.name" -}}
{{- printf "%s" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "cloudpass.operator" -}}{{ include "cloudpass.name" . }}-operator{{- end -}}
{{- define "cloudpass.webhook" -}}{{ include "cloudpass.name" . }}-webhook{{- end -}}

{{- define "cloudpass.labels" -}}
app.kubernetes.io/name: cloudpass
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "cloudpass.selector" -}}
app.kubernetes.io/name: cloudpass
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cloudpass.image" -}}
{{- printf "%s:%s" .repository (default .appVersion .tag) -}}
{{- end -}}

{{/* The restricted Pod Security profile, for every pod. */}}
{{- define "cloudpass.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cloudpass.containerSecurity" -}}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}
