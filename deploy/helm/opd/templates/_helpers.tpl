{{/* Names, labels and the pieces every pod shares. */}}

{{- define "opd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* RELEASE-opd, or RELEASE when it already contains the chart name; at most 40 characters so
     that "-teacher-headless" and pod ordinals still fit in 63. */}}
{{- define "opd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "opd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "opd.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of a component: {root, component, job}; `job` is the Prometheus job name the
     dashboards expect (compose's deploy/prometheus.yml). */}}
{{- define "opd.labels" -}}
{{ include "opd.selectorLabels" . }}
app.kubernetes.io/part-of: opd
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- if .job }}
opd-job: {{ .job }}
{{- end }}
{{- end -}}

{{- define "opd.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{/* Service names. */}}
{{- define "opd.teacher" -}}{{ include "opd.fullname" . }}-teacher{{- end -}}
{{- define "opd.rollout" -}}{{ include "opd.fullname" . }}-rollout{{- end -}}
{{- define "opd.router" -}}{{ include "opd.fullname" . }}-router{{- end -}}
{{- define "opd.trainer" -}}{{ include "opd.fullname" . }}-trainer{{- end -}}

{{/* Where the trainer reaches the teacher: the router when enabled, else the ClusterIP
     Service of the pool. */}}
{{- define "opd.teacherUrl" -}}
{{- if .Values.router.enabled -}}
{{- printf "http://%s:%v" (include "opd.router" .) .Values.router.port -}}
{{- else -}}
{{- printf "http://%s:%v" (include "opd.teacher" .) .Values.teacher.port -}}
{{- end -}}
{{- end -}}

{{/* Rollout replica i by its headless-Service address (weight updates go to each replica). */}}
{{- define "opd.rolloutPodUrl" -}}
{{- $root := index . 0 -}}
{{- printf "http://%s-%d.%s-headless:%v" (include "opd.rollout" $root) (index . 1) (include "opd.rollout" $root) $root.Values.rollout.port -}}
{{- end -}}

{{/* Teacher replica i by its headless-Service address: [root, i]. */}}
{{- define "opd.teacherPodUrl" -}}
{{- $root := index . 0 -}}
{{- printf "http://%s-%d.%s-headless:%v" (include "opd.teacher" $root) (index . 1) (include "opd.teacher" $root) $root.Values.teacher.port -}}
{{- end -}}

{{/* The trainer's services.teacher_urls, as a JSON list: the router when enabled, else every
     teacher pod (the trainer balances requests over them itself). */}}
{{- define "opd.teacherUrls" -}}
{{- $urls := list -}}
{{- if .Values.router.enabled -}}
{{- $urls = list (include "opd.teacherUrl" .) -}}
{{- else -}}
{{- range $i := until (int .Values.teacher.replicas) -}}
{{- $urls = append $urls (include "opd.teacherPodUrl" (list $ $i)) -}}
{{- end -}}
{{- end -}}
{{- toJson $urls -}}
{{- end -}}

{{/* The trainer's services.rollout_urls, as a JSON list: every rollout pod (each one gets every
     weight update directly; requests are balanced by the trainer). */}}
{{- define "opd.rolloutUrls" -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.rollout.replicas) -}}
{{- $urls = append $urls (include "opd.rolloutPodUrl" (list $ $i)) -}}
{{- end -}}
{{- toJson $urls -}}
{{- end -}}

{{- define "opd.apiKeySecret" -}}
{{- default (printf "%s-api-key" (include "opd.fullname" .)) .Values.apiKey.existingSecret -}}
{{- end -}}

{{- define "opd.hfTokenSecret" -}}
{{- default (printf "%s-hf-token" (include "opd.fullname" .)) .Values.hfToken.existingSecret -}}
{{- end -}}

{{- define "opd.sharedClaim" -}}
{{- default (printf "%s-shared" (include "opd.fullname" .)) .Values.storage.shared.existingClaim -}}
{{- end -}}

{{- define "opd.cacheClaim" -}}
{{- default (printf "%s-hf-cache" (include "opd.fullname" .)) .Values.storage.modelCache.existingClaim -}}
{{- end -}}

{{/* HF_HOME, HF_TOKEN and OPD_API_KEY, as compose's x-common-env. */}}
{{- define "opd.commonEnv" -}}
- name: HF_HOME
  value: /cache/huggingface
{{- if or .Values.hfToken.existingSecret .Values.hfToken.value }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "opd.hfTokenSecret" . }}
      key: {{ .Values.hfToken.secretKey }}
{{- end }}
{{- if .Values.apiKey.enabled }}
- name: OPD_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "opd.apiKeySecret" . }}
      key: {{ .Values.apiKey.secretKey }}
{{- end }}
{{- end -}}

{{- define "opd.podSecurityContext" -}}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "opd.containerSecurityContext" -}}
securityContext:
  allowPrivilegeEscalation: false
  capabilities:
    drop: [ALL]
{{- end -}}

{{/* nodeSelector / tolerations / affinity of one component's values. */}}
{{- define "opd.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* resources with nvidia.com/gpu = n in requests and limits: {resources, gpus}. */}}
{{- define "opd.gpuResources" -}}
{{- $res := deepCopy (default dict .resources) -}}
{{- $gpu := dict "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $res "requests" (merge (default dict (get $res "requests")) $gpu) -}}
{{- $_ := set $res "limits" (merge (default dict (get $res "limits")) $gpu) -}}
resources:
  {{- toYaml $res | nindent 2 }}
{{- end -}}

{{/* Prometheus pod annotations: {root, port}. */}}
{{- define "opd.scrapeAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* The model cache volume (PVC or emptyDir). */}}
{{- define "opd.cacheVolume" -}}
- name: hf-cache
{{- if eq .Values.storage.modelCache.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "opd.cacheClaim" . }}
{{- else }}
  emptyDir:
    {{- if .Values.storage.modelCache.sizeLimit }}
    sizeLimit: {{ .Values.storage.modelCache.sizeLimit }}
    {{- else }} {}
    {{- end }}
{{- end }}
{{- end -}}

{{- define "opd.shmVolume" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ . }}
{{- end -}}
