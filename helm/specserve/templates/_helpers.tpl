{{/* Names and labels. */}}
{{- define "specserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "specserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "specserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "specserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "specserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "specserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The project config passed to build_app as serveConfigV2 args: the values' config keys, plus
the custom Ray resources that pin ranks to target pods and draft replicas to draft pods.
*/}}
{{- define "specserve.config" -}}
{{- $cluster := deepCopy .Values.cluster -}}
{{- $rank := get $cluster "target_rank" | default dict -}}
{{- $_ := set $rank "resources" (merge (get $rank "resources" | default dict) (dict "specserve_target" 1)) -}}
{{- $_ := set $cluster "target_rank" $rank -}}
{{- $draft := get $cluster "draft_replica" | default dict -}}
{{- $_ := set $draft "resources" (merge (get $draft "resources" | default dict) (dict "specserve_draft" 1)) -}}
{{- $_ := set $cluster "draft_replica" $draft -}}
{{- with .Values.tls.draft.secretName }}
{{- $_ := set $cluster "draft_tls" (dict "ca_file" "/etc/specserve/draft-tls/ca.crt" "cert_file" "/etc/specserve/draft-tls/tls.crt" "key_file" "/etc/specserve/draft-tls/tls.key") -}}
{{- end }}
{{- $serve := deepCopy .Values.serve -}}
{{- with .Values.tls.http.secretName }}
{{- $_ := set $serve "tls" (dict "cert_file" "/etc/specserve/http-tls/tls.crt" "key_file" "/etc/specserve/http-tls/tls.key") -}}
{{- end }}
{{- toJson (dict "target" .Values.target "draft" .Values.draft "speculation" .Values.speculation "cluster" $cluster "serve" $serve) -}}
{{- end -}}

{{/* Ray resources of one target pod (one engine) and one draft pod, as JSON. */}}
{{- define "specserve.targetPod" -}}
{{- $c := .Values.cluster -}}
{{- $tp := int $c.tp_size -}}
{{- $cpus := addf (mulf $tp $c.target_rank.cpus) $c.coordinator.cpus | ceil | int -}}
{{- $gpus := addf (mulf $tp $c.target_rank.gpus) $c.coordinator.gpus | ceil | int -}}
{{- toJson (dict "cpus" $cpus "gpus" $gpus "custom" $tp) -}}
{{- end -}}

{{- define "specserve.draftPod" -}}
{{- $c := .Values.cluster -}}
{{- $n := int .Values.draftWorkers.replicasPerPod -}}
{{- $cpus := mulf $n $c.draft_replica.cpus | ceil | int -}}
{{- $gpus := mulf $n $c.draft_replica.gpus | ceil | int -}}
{{- toJson (dict "cpus" $cpus "gpus" $gpus "custom" $n) -}}
{{- end -}}

{{/*
One worker group: its size from a Serve autoscaling range (pods = replicas / perPod; fixed at
the max without the autoscaler), its Ray resources (CPU, GPU and the group's custom resource)
and its pod.
*/}}
{{- define "specserve.workerGroup" -}}
{{- $v := .root.Values -}}
{{- $min := int (ceil (divf .range.min_replicas .perPod)) -}}
{{- $max := int (ceil (divf .range.max_replicas .perPod)) -}}
{{- if not $v.autoscaling.enabled }}{{ $min = $max }}{{ end -}}
- groupName: {{ .name }}
  minReplicas: {{ $min }}
  maxReplicas: {{ $max }}
  replicas: {{ $min }}
  rayStartParams: {}
  resources:
    CPU: {{ .pod.cpus | quote }}
    GPU: {{ .pod.gpus | quote }}
    {{ .customKey }}: {{ .pod.custom | quote }}
  template:
    metadata:
      {{- include "specserve.podMetadata" (dict "root" .root "group" .name) | nindent 6 }}
    spec:
      {{- include "specserve.podSpec" (dict "root" .root "placement" .workers) | nindent 6 }}
      containers:
        - name: ray-worker
          image: {{ include "specserve.image" .root }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          securityContext:
            {{- toYaml $v.securityContext | nindent 12 }}
          resources:
            {{- include "specserve.workerResources" (dict "resources" .workers.resources "pod" .pod "gpuResource" .workers.gpuResource "group" .workersKey "why" .why) | nindent 12 }}
          env:
            {{- include "specserve.env" .root | nindent 12 }}
          ports:
            {{- include "specserve.ports" .root | nindent 12 }}
          volumeMounts:
            {{- include "specserve.volumeMounts" .root | nindent 12 }}
{{- end -}}

{{/* The parts of every Ray pod: security, volumes, env, ports, placement. */}}
{{- define "specserve.podMetadata" -}}
labels:
  {{- include "specserve.selectorLabels" .root | nindent 2 }}
  specserve.io/group: {{ .group }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .root.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "specserve.env" -}}
- name: SPECSERVE_CACHE
  value: /home/ray/.cache/specserve
{{- with .Values.auth.apiToken.secretName }}
- name: SPECSERVE_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.auth.apiToken.key }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "specserve.ports" -}}
- name: grpc
  containerPort: {{ int .Values.serve.grpc_port }}
- name: serve
  containerPort: {{ int .Values.serve.http_port }}
- name: metrics
  containerPort: {{ int .Values.monitoring.port }}
{{- end -}}

{{- define "specserve.volumeMounts" -}}
- name: shm
  mountPath: /dev/shm
{{- if .Values.models.volume }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.tls.http.secretName }}
- name: http-tls
  mountPath: /etc/specserve/http-tls
  readOnly: true
{{- end }}
{{- if .Values.tls.draft.secretName }}
- name: draft-tls
  mountPath: /etc/specserve/draft-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "specserve.podSpec" -}}
{{- $v := .root.Values -}}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .placement.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .placement.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .placement.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  - name: shm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $v.shmSize }}
  {{- with $v.models.volume }}
  - name: models
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tls.http.secretName }}
  - name: http-tls
    secret:
      secretName: {{ . }}
      defaultMode: 0440
  {{- end }}
  {{- with $v.tls.draft.secretName }}
  - name: draft-tls
    secret:
      secretName: {{ . }}
      defaultMode: 0440
  {{- end }}
{{- end -}}

{{/*
Container resources of a worker pod: the values' requests and limits, the GPUs the group's Ray
shape needs, and a CPU request of at least its Ray CPUs (the default when none is given).
*/}}
{{- define "specserve.workerResources" -}}
{{- $res := deepCopy .resources -}}
{{- $requests := get $res "requests" | default dict -}}
{{- $limits := get $res "limits" | default dict -}}
{{- if hasKey $requests "cpu" -}}
{{- $q := toString (get $requests "cpu") -}}
{{- $cpu := hasSuffix "m" $q | ternary (divf (trimSuffix "m" $q | float64) 1000) (float64 $q) -}}
{{- if lt $cpu (float64 .pod.cpus) -}}
{{- fail (printf "%s.resources.requests.cpu (%s) is less than the %d Ray CPUs of one pod (%s)" .group $q (int .pod.cpus) .why) -}}
{{- end -}}
{{- else -}}
{{- $_ := set $requests "cpu" (toString .pod.cpus) -}}
{{- end -}}
{{- if .pod.gpus -}}
{{- $_ := set $requests .gpuResource (int .pod.gpus) -}}
{{- $_ := set $limits .gpuResource (int .pod.gpus) -}}
{{- end -}}
{{- $_ := set $res "requests" $requests -}}
{{- if $limits }}{{ $_ := set $res "limits" $limits }}{{ end -}}
{{- toYaml $res -}}
{{- end -}}
