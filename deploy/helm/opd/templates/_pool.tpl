{{/*
A service pool: StatefulSet + headless Service (per-pod DNS) + ClusterIP Service (requests).
Parameters: root, component (teacher | rollout), job (Prometheus job name), values, image.
The images' ENTRYPOINT is `opd teacher` / `opd rollout`; settings come as OPD_* env, exactly
as docker-compose.yml passes them; extraArgs are appended as flags.
*/}}
{{- define "opd.pool" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- $name := printf "%s-%s" (include "opd.fullname" $root) .component -}}
{{- $ctx := dict "root" $root "component" .component "job" .job -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}-headless
  labels:
    {{- include "opd.labels" $ctx | nindent 4 }}
    opd-metrics: "true"
spec:
  clusterIP: None
  # Per-pod DNS names resolve while a pod loads its model (the trainer and the router wait on
  # /ready themselves).
  publishNotReadyAddresses: true
  selector:
    {{- include "opd.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: http
      port: {{ $v.port }}
      targetPort: http
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  labels:
    {{- include "opd.labels" $ctx | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "opd.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: http
      port: {{ $v.port }}
      targetPort: http
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ $name }}
  labels:
    {{- include "opd.labels" $ctx | nindent 4 }}
spec:
  serviceName: {{ $name }}-headless
  replicas: {{ $v.replicas }}
  podManagementPolicy: Parallel
  selector:
    matchLabels:
      {{- include "opd.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "opd.labels" $ctx | nindent 8 }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with merge (include "opd.scrapeAnnotations" (dict "root" $root "port" $v.port) | fromYaml) (deepCopy $root.Values.podAnnotations) }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- with (include "opd.podSecurityContext" $root | trim) }}{{ . | nindent 6 }}{{ end }}
      terminationGracePeriodSeconds: 60
      containers:
        - name: {{ .component }}
          image: {{ include "opd.image" .image }}
          imagePullPolicy: {{ $root.Values.images.pullPolicy }}
          {{- with $v.extraArgs }}
          args:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          env:
            {{- include "opd.commonEnv" $root | trim | nindent 12 }}
            - name: OPD_MODEL
              value: {{ $v.model | quote }}
            - name: OPD_BACKEND
              value: vllm
            - name: OPD_HOST
              value: 0.0.0.0
            - name: OPD_PORT
              value: {{ $v.port | quote }}
            {{- if eq .component "rollout" }}
            - name: OPD_WEIGHTS_DIR
              value: /shared/weights
            {{- end }}
            - name: OPD_TENSOR_PARALLEL_SIZE
              value: {{ $v.tensorParallelSize | quote }}
            {{- if $v.maxModelLen }}
            - name: OPD_MAX_MODEL_LEN
              value: {{ $v.maxModelLen | quote }}
            {{- end }}
            - name: OPD_DTYPE
              value: {{ $v.dtype | quote }}
            - name: OPD_GPU_MEMORY_UTILIZATION
              value: {{ $v.gpuMemoryUtilization | quote }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: http
              containerPort: {{ $v.port }}
          # /ready: 200 once the model is loaded, 503 before; /health: the process is up.
          startupProbe:
            httpGet:
              path: /ready
              port: http
            periodSeconds: {{ $v.startupProbe.periodSeconds }}
            timeoutSeconds: 10
            failureThreshold: {{ $v.startupProbe.failureThreshold }}
          readinessProbe:
            httpGet:
              path: /ready
              port: http
            periodSeconds: {{ $v.readinessProbe.periodSeconds }}
            timeoutSeconds: {{ $v.readinessProbe.timeoutSeconds }}
            failureThreshold: {{ $v.readinessProbe.failureThreshold }}
          livenessProbe:
            httpGet:
              path: /health
              port: http
            periodSeconds: {{ $v.livenessProbe.periodSeconds }}
            timeoutSeconds: {{ $v.livenessProbe.timeoutSeconds }}
            failureThreshold: {{ $v.livenessProbe.failureThreshold }}
          {{- include "opd.gpuResources" (dict "resources" $v.resources "gpus" $v.tensorParallelSize) | trim | nindent 10 }}
          {{- include "opd.containerSecurityContext" $root | trim | nindent 10 }}
          volumeMounts:
            - name: hf-cache
              mountPath: /cache/huggingface
            - name: dshm
              mountPath: /dev/shm
            {{- if eq .component "rollout" }}
            - name: shared
              mountPath: /shared
            {{- end }}
      volumes:
        {{- include "opd.cacheVolume" $root | trim | nindent 8 }}
        {{- include "opd.shmVolume" $v.shmSize | trim | nindent 8 }}
        {{- if eq .component "rollout" }}
        - name: shared
          persistentVolumeClaim:
            claimName: {{ include "opd.sharedClaim" $root }}
        {{- end }}
      {{- with (include "opd.scheduling" $v | trim) }}{{ . | nindent 6 }}{{ end }}
{{- end -}}
