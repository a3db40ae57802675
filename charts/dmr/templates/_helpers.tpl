{{/* The chart name, or nameOverride. */}}
{{- define "dmr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's resource name: the release name, plus the chart name unless it has it. */}}
{{- define "dmr.fullname" -}}
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

{{/* The governing (headless) Service: pods are <fullname>-N.<this name>. */}}
{{- define "dmr.headlessName" -}}
{{- printf "%s-headless" (include "dmr.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dmr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dmr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dmr.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dmr.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "dmr.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
A probe of GET <path> on the daemon. Without API keys an httpGet probe; with them the
kubelet cannot send a key from a Secret, so the probe runs Python in the container and
sends the first of the daemon's keys (DMR_API_KEYS, from the Secret).
*/}}
{{- define "dmr.probe" -}}
{{- $path := index . 0 }}
{{- $root := index . 1 }}
{{- $settings := index . 2 }}
{{- if $root.Values.apiKeys.existingSecret }}
exec:
  command:
    - python3
    - -c
    - "import http.client, os, sys; key = os.environ['DMR_API_KEYS'].split(',')[0].strip(); conn = http.client.HTTPConnection('127.0.0.1', 12434, timeout=4); conn.request('GET', sys.argv[1], headers={'Authorization': 'Bearer ' + key}); sys.exit(conn.getresponse().status != 200)"
    - {{ $path | quote }}
{{- else }}
httpGet:
  path: {{ $path }}
  port: http
{{- end }}
{{ toYaml $settings }}
{{- end }}
