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

{{- define "cloudpass.broker" -}}{{ include "cloudpass.name" . }}-broker{{- end -}}

{{/* The port the broker serves HTTPS on, in the pod and on its Service. */}}
{{- define "cloudpass.brokerPort" -}}8443{{- end -}}

{{/* The plain-HTTP port serving only the issuer's documents (with issuer.ingress). */}}
{{- define "cloudpass.issuerPort" -}}8081{{- end -}}

{{/* The issuer URL: issuer.url, or the broker's in-cluster URL. */}}
{{- define "cloudpass.issuerURL" -}}
{{- if .Values.issuer.url -}}
{{- .Values.issuer.url | trimSuffix "/" -}}
{{- else -}}
{{- printf "https://%s.%s.svc:%s" (include "cloudpass.broker" .) .Release.Namespace (include "cloudpass.brokerPort" .) -}}
{{- end -}}
{{- end -}}

{{/* The host of issuer.url, for the Ingress; fails rendering when it cannot serve it. */}}
{{- define "cloudpass.issuerHost" -}}
{{- if not .Values.issuer.url -}}
{{- fail "issuer.ingress.enabled needs issuer.url: the public https URL the clouds will fetch the issuer's documents from" -}}
{{- end -}}
{{- $url := urlParse .Values.issuer.url -}}
{{- if not (eq (trimSuffix "/" $url.path) "") -}}
{{- fail (printf "issuer.ingress serves the issuer's documents at the root of a host; issuer.url %q has a path (host it with `cloudpass-operator export-issuer` instead)" .Values.issuer.url) -}}
{{- end -}}
{{- if contains ":" $url.host -}}
{{- fail (printf "issuer.ingress serves port 443; issuer.url %q names a port" .Values.issuer.url) -}}
{{- end -}}
{{- $url.host -}}
{{- end -}}
