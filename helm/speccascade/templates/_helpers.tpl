{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "speccascade.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart> unless the release name already contains the chart name. Kept to
40 characters because KubeRay derives longer names (cluster, head service, pods) from it.
*/}}
{{- define "speccascade.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "speccascade.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "speccascade.selectorLabels" -}}
app.kubernetes.io/name: {{ include "speccascade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "speccascade.labels" -}}
helm.sh/chart: {{ include "speccascade.chart" . }}
{{ include "speccascade.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Name of the Service in front of Serve's gRPC proxies. */}}
{{- define "speccascade.grpcServiceName" -}}
{{- printf "%s-grpc" (include "speccascade.fullname" .) }}
{{- end }}

{{/* The image: repository:tag, the tag defaulting to what `make image` builds, <appVersion>-<flavour>
(values.schema.json holds image.flavour to cpu or cuda). */}}
{{- define "speccascade.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.flavour) | toString }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/*
Value of the `resources` rayStartParam: KubeRay pastes it into the `ray start` shell command, so
it is a JSON object wrapped in one more pair of quotes with the inner quotes escaped, e.g.
"{\"drafter_tier\":1}" (the form the Ray autoscaler parses back).
*/}}
{{- define "speccascade.rayResourcesParam" -}}
{{- printf "%q" (toJson .) }}
{{- end }}

{{/*
Fails rendering unless a group's container resources set both requests and limits.
Arguments: dict "resources" <map> "path" <values path for the message>.
*/}}
{{- define "speccascade.requireResources" -}}
{{- $resources := .resources | default dict }}
{{- if not (and $resources.requests $resources.limits) }}
{{- fail (printf "%s must set both requests and limits (cpu, memory, and %s for a GPU tier); got %s" .path .gpuResourceName (toJson .resources)) }}
{{- end }}
{{- end }}

{{/*
The one pod template of every Ray group (head and workers). Arguments (dict):
  root           the chart's top-level context
  group          the group's values (resources, nodeSelector, tolerations, affinity, pod labels
                 and annotations, env, volumes, volumeMounts)
  component      `head` or the tier name, used as the component label
  containerName  ray-head or ray-worker
  ports          container ports of this group besides Serve's (serve, grpc) and metrics
Every group gets Serve's ports: proxies run on every node, and KubeRay probes a proxy's health
over HTTP on the container port named `serve`.
*/}}
{{- define "speccascade.podTemplate" -}}
{{- $root := .root }}
{{- $values := $root.Values }}
{{- $group := .group }}
{{- $annotations := dict }}
{{- if $values.metrics.podAnnotations }}
{{- $_ := set $annotations "prometheus.io/scrape" "true" }}
{{- $_ := set $annotations "prometheus.io/port" ($values.metrics.port | toString) }}
{{- $_ := set $annotations "prometheus.io/path" "/metrics" }}
{{- end }}
{{- $annotations = merge (deepCopy ($group.podAnnotations | default dict)) $annotations -}}
metadata:
  labels:
    {{- include "speccascade.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with $values.commonLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $group.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $values.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .containerName }}
      image: {{ include "speccascade.image" $root }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      resources:
        {{- toYaml $group.resources | nindent 8 }}
      ports:
        {{- range .ports }}
        - name: {{ .name }}
          containerPort: {{ .port }}
          protocol: TCP
        {{- end }}
        - name: serve
          containerPort: {{ $values.serve.httpPort }}
          protocol: TCP
        - name: grpc
          containerPort: {{ $values.serve.grpcPort }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $values.metrics.port }}
          protocol: TCP
      {{- with concat ($values.env | default list) ($group.env | default list) }}
      env:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
      volumeMounts:
        - name: shared-memory
          mountPath: /dev/shm
        {{- if $values.tenantAuth.existingSecret }}
        - name: tenants
          mountPath: {{ $values.tenantAuth.mountPath }}
          readOnly: true
        {{- end }}
        {{- if $values.resumeKey.existingSecret }}
        - name: resume-key
          mountPath: {{ $values.resumeKey.mountPath }}
          readOnly: true
        {{- end }}
        {{- with $group.volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: shared-memory
      emptyDir:
        medium: Memory
        sizeLimit: {{ $values.sharedMemorySize }}
    {{- with $values.tenantAuth.existingSecret }}
    - name: tenants
      secret:
        secretName: {{ . }}
        items:
          - key: {{ $values.tenantAuth.secretKey }}
            path: tenants.yaml
    {{- end }}
    {{- with $values.resumeKey.existingSecret }}
    - name: resume-key
      secret:
        secretName: {{ . }}
        items:
          - key: {{ $values.resumeKey.secretKey }}
            path: resume.key
    {{- end }}
    {{- with $group.volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
The Serve application's `args`: the `app` values (speccascade.config.app.AppConfig, validated by
values.schema.json) as written, with each tier's pinning resource added to its
placement.resources. Its worker group advertises the same resource (speccascade.workerGroup).
*/}}
{{- define "speccascade.appArgs" -}}
{{- $v := .Values }}
{{- $app := deepCopy ($v.app | default dict) }}
{{- $tenancy := $app.tenancy | default dict }}
{{- if $v.tenantAuth.existingSecret }}
{{- if $tenancy.tenants_file }}
{{- fail "app.tenancy.tenants_file: the chart sets it to the mounted tenantAuth.existingSecret; remove it" }}
{{- end }}
{{- $_ := set $tenancy "tenants_file" (printf "%s/tenants.yaml" (trimSuffix "/" $v.tenantAuth.mountPath)) }}
{{- $_ := set $app "tenancy" $tenancy }}
{{- else if $v.tenantAuth.required }}
{{- fail "tenantAuth.required is true but tenantAuth.existingSecret is empty: create a Secret with the tenants file (speccascade tenants add ...; kubectl create secret generic NAME --from-file=tenants.yaml) and name it here" }}
{{- end }}
{{- if $v.resumeKey.existingSecret }}
{{- $router := $app.router | default dict }}
{{- if $router.resume_key_file }}
{{- fail "app.router.resume_key_file: the chart sets it to the mounted resumeKey.existingSecret; remove it" }}
{{- end }}
{{- $_ := set $router "resume_key_file" (printf "%s/resume.key" (trimSuffix "/" $v.resumeKey.mountPath)) }}
{{- $_ := set $app "router" $router }}
{{- end }}
{{- $pins := dict }}
{{- range $tierName := list "drafter" "expert" }}
{{- $_ := set $pins (index $v.tiers $tierName).rayResource.name $tierName }}
{{- end }}
{{- range $tierName := list "drafter" "expert" }}
{{- $tier := index $app $tierName | default dict }}
{{- $placement := $tier.placement | default dict }}
{{- $resources := $placement.resources | default dict }}
{{- range $name := keys $resources | sortAlpha }}
{{- if hasKey $pins $name }}
{{- fail (printf "app.%s.placement.resources.%s: the chart sets the resources that pin tiers to their worker groups (from tiers.%s.rayResource); remove it" $tierName $name (index $pins $name)) }}
{{- end }}
{{- end }}
{{- $rayResource := (index $v.tiers $tierName).rayResource }}
{{- $_ := set $resources $rayResource.name $rayResource.perReplica }}
{{- $_ := set $placement "resources" $resources }}
{{- $_ := set $tier "placement" $placement }}
{{- $_ := set $app $tierName $tier }}
{{- end }}
{{- toYaml $app }}
{{- end }}

{{/*
The deployments `speccascade.app:build_app` creates, by Serve name, each with the tier whose
worker group hosts it (the router has none: it runs wherever router.rayResources allow).
*/}}
{{- define "speccascade.appDeployments" -}}
Router: ""
Drafter: drafter
Expert: expert
{{- end }}

{{/*
The application's `deployments` entries (a YAML list): each autoscaling.deployments[] entry's
`autoscaling_config`, under the name of the deployment it configures. Ray only collects a
deployment's record_autoscaling_stats() when it autoscales, so the entries are passed through
verbatim; the chart checks that each names a deployment of the application, once, and that a
tier's max_replicas fits its worker group. No entry sets num_replicas: the autoscaling_config
replaces the replica count the application's args give the deployment.
*/}}
{{- define "speccascade.deploymentOverrides" -}}
{{- $v := .Values }}
{{- $known := include "speccascade.appDeployments" . | fromYaml }}
{{- $seen := dict }}
{{- $overrides := list }}
{{- range $index, $entry := $v.autoscaling.deployments | default list }}
{{- $path := printf "autoscaling.deployments[%d]" $index }}
{{- if not (kindIs "map" $entry) }}
{{- fail (printf "%s must be a map with name and autoscaling_config; got %s" $path (toJson $entry)) }}
{{- end }}
{{- $name := $entry.name | default "" | toString }}
{{- if not (hasKey $known $name) }}
{{- fail (printf "%s.name=%q is not a deployment of the application; expected one of %s" $path $name (keys $known | sortAlpha | join ", ")) }}
{{- end }}
{{- if hasKey $seen $name }}
{{- fail (printf "%s.name=%q is listed twice in autoscaling.deployments" $path $name) }}
{{- end }}
{{- $_ := set $seen $name true }}
{{- $unknown := without (keys $entry | sortAlpha) "name" "autoscaling_config" }}
{{- if $unknown }}
{{- fail (printf "%s (%s) has keys %s; only name and autoscaling_config are merged into the deployment" $path $name (join ", " $unknown)) }}
{{- end }}
{{- $config := $entry.autoscaling_config }}
{{- if not (and (kindIs "map" $config) $config) }}
{{- fail (printf "%s (%s).autoscaling_config must be a non-empty map; got %s" $path $name (toJson $config)) }}
{{- end }}
{{- $tierName := index $known $name }}
{{- if and $tierName (hasKey $config "max_replicas") }}
{{- $group := (index $v.tiers $tierName).workerGroup }}
{{- $capacity := mul (int $group.maxReplicas) (int $group.replicasPerPod) }}
{{- if gt (int $config.max_replicas) $capacity }}
{{- fail (printf "%s (%s).autoscaling_config.max_replicas=%v cannot fit: tiers.%s.workerGroup.maxReplicas=%v pods x replicasPerPod=%v" $path $name $config.max_replicas $tierName $group.maxReplicas $group.replicasPerPod) }}
{{- end }}
{{- end }}
{{- $overrides = append $overrides (dict "name" $name "autoscaling_config" $config) }}
{{- end }}
{{- toYaml $overrides }}
{{- end }}

{{/*
The Serve config (ServeDeploySchema) embedded as the RayService's serveConfigV2. The one
application's `args` are the `app` values (speccascade.config.app.AppConfig).
*/}}
{{- define "speccascade.serveConfig" -}}
{{- $v := .Values }}
{{- $application := dict
  "name" $v.serve.applicationName
  "import_path" $v.serve.importPath
  "route_prefix" "/"
  "runtime_env" ($v.serve.runtimeEnv | default dict)
  "args" (include "speccascade.appArgs" . | fromYaml) }}
{{- /* Application-level autoscaling policy: owned by the autoscaling settings, passed through verbatim. */}}
{{- with $v.autoscaling.autoscalingPolicy }}
{{- $_ := set $application "autoscaling_policy" . }}
{{- end }}
{{- with include "speccascade.deploymentOverrides" . | fromYamlArray }}
{{- $_ := set $application "deployments" . }}
{{- end }}
{{- $grpc := dict "port" $v.serve.grpcPort "grpc_servicer_functions" $v.serve.grpcServicerFunctions }}
{{- if not (kindIs "invalid" $v.serve.grpcRequestTimeoutS) }}
{{- $_ := set $grpc "request_timeout_s" $v.serve.grpcRequestTimeoutS }}
{{- end }}
{{- $config := dict
  "proxy_location" $v.serve.proxyLocation
  "http_options" (dict "host" "0.0.0.0" "port" $v.serve.httpPort)
  "grpc_options" $grpc
  "applications" (list $application) }}
{{- toYaml $config }}
{{- end }}

{{/*
A worker group for one tier, with the checks that keep it consistent with the tier's deployment.
Arguments: dict "root" <context> "tierName" <drafter|expert> "tier" <tiers.<tier> values>
"app" <app.<tier> values>.
*/}}
{{- define "speccascade.workerGroup" -}}
{{- $root := .root }}
{{- $tierName := .tierName }}
{{- $tier := .tier }}
{{- $group := $tier.workerGroup }}
{{- $placement := (.app | default dict).placement | default dict }}
{{- $replicas := (.app | default dict).replicas | default dict }}
{{- $gpuName := $root.Values.gpuResourceName }}
{{- include "speccascade.requireResources" (dict "resources" $group.resources "path" (printf "tiers.%s.workerGroup.resources" $tierName) "gpuResourceName" $gpuName) }}
{{- $perReplica := int $tier.rayResource.perReplica }}
{{- $perPod := int $group.replicasPerPod }}
{{- $initialPods := $group.replicas | default $group.minReplicas }}
{{- if or (gt (int $group.minReplicas) (int $group.maxReplicas)) (lt (int $initialPods) (int $group.minReplicas)) (gt (int $initialPods) (int $group.maxReplicas)) }}
{{- fail (printf "tiers.%s.workerGroup needs minReplicas <= replicas <= maxReplicas; got %v <= %v <= %v" $tierName $group.minReplicas $initialPods $group.maxReplicas) }}
{{- end }}
{{- if and (hasKey $replicas "max_replicas") (gt (int $replicas.max_replicas) (mul (int $group.maxReplicas) $perPod)) }}
{{- fail (printf "app.%s.replicas.max_replicas=%v cannot fit: tiers.%s.workerGroup.maxReplicas=%v pods x replicasPerPod=%v" $tierName $replicas.max_replicas $tierName $group.maxReplicas $perPod) }}
{{- end }}
{{- $gpusNeeded := mulf ($placement.num_gpus | default 0) $perPod }}
{{- $gpusInPod := float64 (index ($group.resources.limits | default dict) $gpuName | default 0) }}
{{- if gt $gpusNeeded $gpusInPod }}
{{- fail (printf "tiers.%s needs %v GPUs per pod (app.%s.placement.num_gpus=%v x tiers.%s.workerGroup.replicasPerPod=%v) but tiers.%s.workerGroup.resources.limits[%q] is %v" $tierName $gpusNeeded $tierName ($placement.num_gpus | default 0) $tierName $perPod $tierName $gpuName $gpusInPod) }}
{{- end }}
{{- if hasKey ($group.rayStartParams | default dict) "resources" }}
{{- fail (printf "tiers.%s.workerGroup.rayStartParams.resources is set by the chart from tiers.%s.rayResource; remove it" $tierName $tierName) }}
{{- end }}
{{- $advertised := dict $tier.rayResource.name (mul $perReplica $perPod) }}
{{- /* Ray detects `accelerator_type:<T>` on a GPU node only once it runs; advertising it lets the
autoscaler see that this group can host replicas that ask for accelerator type T. */}}
{{- with $placement.accelerator_type }}
{{- $_ := set $advertised (printf "accelerator_type:%s" .) 1 }}
{{- end }}
{{- $startParams := merge (dict "resources" (include "speccascade.rayResourcesParam" $advertised) "metrics-export-port" ($root.Values.metrics.port | toString)) ($group.rayStartParams | default dict) -}}
- groupName: {{ $group.groupName }}
  minReplicas: {{ $group.minReplicas }}
  maxReplicas: {{ $group.maxReplicas }}
  replicas: {{ $initialPods }}
  {{- with $group.idleTimeoutSeconds }}
  idleTimeoutSeconds: {{ . }}
  {{- end }}
  rayStartParams:
    {{- range $key, $value := $startParams }}
    {{ $key }}: {{ $value | toString | quote }}
    {{- end }}
  template:
    {{- include "speccascade.podTemplate" (dict "root" $root "group" $group "component" $tierName "containerName" "ray-worker" "ports" list) | nindent 4 }}
{{- end }}

{{/* The test pod's API key (tests.apiKeySecret) as the CLI's environment variable; nothing without one. */}}
{{- define "speccascade.testApiKeyEnv" -}}
{{- with .Values.tests.apiKeySecret.name }}
env:
  - name: SPECCASCADE_API_KEY
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $.Values.tests.apiKeySecret.key }}
{{- end }}
{{- end }}
