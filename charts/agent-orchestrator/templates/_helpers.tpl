{{/*
Names, labels, images and the pieces every pod shares. One place for each so that every
component is rendered the same way (labels, security, env, volumes).
*/}}

{{- define "ao.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every object name. Service names must be DNS-1035 labels, but Helm accepts
release names with dots (`chat.eu`) or a leading digit: dots become dashes, and a name that does
not start with a letter gets an "ao-" prefix. fullnameOverride goes through the same rule.
*/}}
{{- define "ao.fullname" -}}
{{- $full := "" -}}
{{- if .Values.fullnameOverride -}}
{{- $full = .Values.fullnameOverride -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- $full = .Release.Name -}}
{{- else -}}
{{- $full = printf "%s-%s" .Release.Name $name -}}
{{- end -}}
{{- end -}}
{{- $full = $full | lower | replace "." "-" | replace "_" "-" -}}
{{- if not (regexMatch "^[a-z]" $full) -}}
{{- $full = printf "ao-%s" $full -}}
{{- end -}}
{{- $full | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
<fullname>-<component>, kept within 63 characters (or .max): the fullname is cut, never the
component, so names stay unique. Call with (dict "root" $ "component" "api").
*/}}
{{- define "ao.componentName" -}}
{{- $max := int (default 63 .max) -}}
{{- printf "%s-%s" (include "ao.fullname" .root | trunc (int (sub (sub $max 1) (len .component))) | trimSuffix "-") .component -}}
{{- end -}}

{{/*
Name of an in-chart datastore's StatefulSet, and of its Service and Secret (one name for the
three). The StatefulSet controller labels every pod controller-revision-hash=<name>-<hash of up
to 10 characters>, a label value of at most 63: longer names give pods the API server refuses.
Call with (dict "root" $ "component" "redis").
*/}}
{{- define "ao.statefulSetName" -}}
{{- include "ao.componentName" (dict "root" .root "component" .component "max" 52) -}}
{{- end -}}

{{- define "ao.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: only name, instance and component (immutable on Deployments). */}}
{{- define "ao.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ao.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Every label of a component's objects. Call with (dict "root" $ "component" "api"). */}}
{{- define "ao.labels" -}}
{{ include "ao.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: agent-orchestrator
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "ao.chart" .root }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of objects that belong to no single component (ConfigMap, Secret, policies). */}}
{{- define "ao.commonLabels" -}}
{{ include "ao.labels" (dict "root" . "component" "shared") }}
{{- end -}}

{{- define "ao.serviceAccountName" -}}
{{- $sa := index .root.Values .component "serviceAccount" -}}
{{- default (include "ao.componentName" .) $sa.name -}}
{{- end -}}

{{/*
Image reference. Call with (dict "root" $ "image" .Values.api.image "fallback" .Values.worker.image).
Fields empty in `image` fall back to `fallback`; the tag defaults to the appVersion; a tag of the
form "tag@sha256:..." (skaffold) is split; a digest wins over the tag.
*/}}
{{- define "ao.image" -}}
{{- $fallback := default dict .fallback -}}
{{- $own := default dict .image -}}
{{- $image := mergeOverwrite (deepCopy $fallback) $own -}}
{{- /* The fallback's digest pins the fallback's image: an own registry, repository or tag
     names another one (pulled by digest, the override would be ignored). */ -}}
{{- if and (not $own.digest) (or $own.registry $own.repository $own.tag) -}}
{{- $_ := set $image "digest" "" -}}
{{- end -}}
{{- $repository := required "image repository is required" $image.repository -}}
{{- $tag := toString (default .root.Chart.AppVersion (toString (default "" $image.tag))) -}}
{{- $digest := toString (default "" $image.digest) -}}
{{- if contains "@" $tag -}}
{{- $parts := splitList "@" $tag -}}
{{- $tag = first $parts -}}
{{- if and (not $digest) (last $parts) -}}
{{- $digest = last $parts -}}
{{- end -}}
{{- end -}}
{{- $name := $repository -}}
{{- if $image.registry -}}
{{- $name = printf "%s/%s" $image.registry $repository -}}
{{- end -}}
{{- if $tag -}}
{{- $name = printf "%s:%s" $name $tag -}}
{{- end -}}
{{- if $digest -}}
{{- $name = printf "%s@%s" $name $digest -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "ao.imagePullPolicy" -}}
{{- $fallback := default dict .fallback -}}
{{- $image := mergeOverwrite (deepCopy $fallback) (default dict .image) -}}
{{- default "IfNotPresent" $image.pullPolicy -}}
{{- end -}}

{{- define "ao.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "ao.podSecurityContext" -}}
securityContext:
{{ toYaml .Values.podSecurityContext | indent 2 }}
{{- end -}}

{{- define "ao.containerSecurityContext" -}}
securityContext:
{{ toYaml .Values.containerSecurityContext | indent 2 }}
{{- end -}}

{{/* The only writable path of every container. */}}
{{- define "ao.tmpVolume" -}}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end -}}

{{/* extraVolumes, after the chart's own volumes (a list item each). */}}
{{- define "ao.extraVolumes" -}}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* extraVolumeMounts, after the chart's own mounts. */}}
{{- define "ao.extraVolumeMounts" -}}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "ao.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "ao.tiersVolume" -}}
- name: tiers
  configMap:
    name: {{ include "ao.componentName" (dict "root" . "component" "tiers") }}
{{- end -}}

{{- define "ao.tiersMount" -}}
- name: tiers
  mountPath: /etc/agent-orchestrator
  readOnly: true
{{- end -}}

{{/* Where the URL of Redis comes from: a Secret name and key. */}}
{{- define "ao.redisSecret" -}}
{{- if .Values.redis.enabled -}}
{{ include "ao.statefulSetName" (dict "root" . "component" "redis") }}
{{- else if .Values.externalRedis.existingSecret -}}
{{ .Values.externalRedis.existingSecret }}
{{- else -}}
{{ include "ao.componentName" (dict "root" . "component" "connections") }}
{{- end -}}
{{- end -}}

{{- define "ao.redisSecretKey" -}}
{{- if .Values.redis.enabled -}}
redis-url
{{- else if .Values.externalRedis.existingSecret -}}
{{ .Values.externalRedis.existingSecretKey }}
{{- else -}}
redis-url
{{- end -}}
{{- end -}}

{{- define "ao.hasRedisUrl" -}}
{{- if or .Values.redis.enabled .Values.externalRedis.existingSecret .Values.externalRedis.url -}}true{{- end -}}
{{- end -}}

{{- define "ao.hasDatabase" -}}
{{- if or .Values.postgresql.enabled .Values.externalDatabase.existingSecret .Values.externalDatabase.url -}}true{{- end -}}
{{- end -}}

{{- define "ao.databaseSecret" -}}
{{- if .Values.postgresql.enabled -}}
{{ include "ao.statefulSetName" (dict "root" . "component" "postgresql") }}
{{- else if .Values.externalDatabase.existingSecret -}}
{{ .Values.externalDatabase.existingSecret }}
{{- else -}}
{{ include "ao.componentName" (dict "root" . "component" "connections") }}
{{- end -}}
{{- end -}}

{{/*
The in-chart PostgreSQL's URL with `password`. Call with (dict "root" $ "password" ...).
Percent-encoded: a base64 password ('/', '+', '=') would otherwise end the userinfo early.
urlquery is Go's QueryEscape (a space becomes '+'), hence the %20. The user and the database
name are identifiers (schema), nothing to encode.
*/}}
{{- define "ao.postgresqlUrl" -}}
{{- $pg := .root.Values.postgresql -}}
{{- $host := include "ao.statefulSetName" (dict "root" .root "component" "postgresql") -}}
{{- printf "postgresql://%s:%s@%s:5432/%s" $pg.username (.password | urlquery | replace "+" "%20") $host $pg.database -}}
{{- end -}}

{{- define "ao.databaseSecretKey" -}}
{{- if .Values.postgresql.enabled -}}
database-url
{{- else if .Values.externalDatabase.existingSecret -}}
{{ .Values.externalDatabase.existingSecretKey }}
{{- else -}}
database-url
{{- end -}}
{{- end -}}

{{- define "ao.jwtSecretName" -}}
{{- default (include "ao.componentName" (dict "root" . "component" "jwt")) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "ao.jwtUsesPublicKey" -}}
{{- if not (hasPrefix "HS" .Values.auth.algorithm) -}}true{{- end -}}
{{- end -}}

{{/*
Env of every orchestrator container: pod name from the downward API, the secrets, OpenTelemetry.
Everything else comes from the settings ConfigMap through envFrom. Call with
(dict "root" $ "component" "api" "extraEnv" .Values.api.extraEnv).
*/}}
{{- define "ao.env" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
- name: ORCHESTRATOR_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- if include "ao.hasRedisUrl" $root }}
- name: ORCHESTRATOR_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "ao.redisSecret" $root }}
      key: {{ include "ao.redisSecretKey" $root }}
{{- end }}
{{- if and (include "ao.hasDatabase" $root) (has .component (list "api" "worker" "migrations")) }}
- name: ORCHESTRATOR_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "ao.databaseSecret" $root }}
      key: {{ include "ao.databaseSecretKey" $root }}
{{- end }}
{{- if has .component (list "api" "test") }}
{{- if include "ao.jwtUsesPublicKey" $root }}
- name: ORCHESTRATOR_JWT_PUBLIC_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "ao.jwtSecretName" $root }}
      key: {{ ternary $v.auth.existingSecretPublicKeyKey "jwt-public-key" (ne $v.auth.existingSecret "") }}
{{- if $v.auth.jwksUrl }}
      optional: true  # the identity provider's keys (auth.jwksUrl) may be the only ones
{{- end }}
{{- else }}
- name: ORCHESTRATOR_JWT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "ao.jwtSecretName" $root }}
      key: {{ ternary $v.auth.existingSecretKey "jwt-secret" (ne $v.auth.existingSecret "") }}
{{- if or $v.auth.previousSecret $v.auth.existingSecret }}
- name: ORCHESTRATOR_JWT_PREVIOUS_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "ao.jwtSecretName" $root }}
      key: {{ ternary $v.auth.existingSecretPreviousKey "jwt-previous-secret" (ne $v.auth.existingSecret "") }}
      optional: true  # a rotation's old secret, only while one is under way
{{- end }}
{{- end }}
{{- end }}
{{- if eq .component "worker" }}
{{- include "ao.kedaRedisPasswordEnv" $root }}
{{- end }}
- name: OTEL_SERVICE_NAME
  value: agent-orchestrator-{{ .component }}
{{- if $v.otel.enabled }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $v.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $v.otel.protocol | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $v.otel.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $v.otel.samplerArg | quote }}
{{- $attributes := list "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.pod.name=$(ORCHESTRATOR_POD_NAME)" (printf "service.version=%s" $root.Chart.AppVersion) }}
{{- range $key, $value := $v.otel.resourceAttributes }}
{{- $attributes = append $attributes (printf "%s=%s" $key $value) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attributes | quote }}
{{- else }}
- name: OTEL_SDK_DISABLED
  value: "true"
{{- end }}
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* KEDA's redis-streams trigger reads the password from an env var of the scale target. */}}
{{- define "ao.kedaRedisPassword" -}}
{{- $v := .Values -}}
{{- if and (eq $v.autoscaling.mode "keda") $v.autoscaling.keda.redisPasswordSecret.name -}}
{{ $v.autoscaling.keda.redisPasswordSecret.name }}/{{ required "autoscaling.keda.redisPasswordSecret.key is required with its name" $v.autoscaling.keda.redisPasswordSecret.key }}
{{- else if and (eq $v.autoscaling.mode "keda") $v.redis.enabled -}}
{{ include "ao.statefulSetName" (dict "root" . "component" "redis") }}/redis-password
{{- end -}}
{{- end -}}

{{- define "ao.kedaRedisPasswordEnv" -}}
{{- $ref := include "ao.kedaRedisPassword" . -}}
{{- if $ref }}
- name: KEDA_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ first (splitList "/" $ref) }}
      key: {{ last (splitList "/" $ref) }}
{{- end }}
{{- end -}}

{{/*
A value that changes when a password changes and does not give the password away: pod
annotations are readable by anyone who may read pods (the `view` role, which excludes Secrets),
and a plain SHA-256 of a chosen password falls to a dictionary in seconds. derivePassword is
scrypt (N=32768, r=8: about 0.1 s and 32 MiB per guess), salted with the release, and
deterministic, so a render without a change keeps the value. Every pod template asks for the
same ones: they are kept for the rest of the render in a dict on the root context (shared by
the chart's templates), so each costs one scrypt per render. Call with
(dict "root" $ "password" "...").
*/}}
{{- define "ao.passwordDigest" -}}
{{- if not (hasKey .root "aoPasswordDigests") -}}
{{- $_ := set .root "aoPasswordDigests" dict -}}
{{- end -}}
{{- $memo := .root.aoPasswordDigests -}}
{{- $key := sha256sum .password -}}
{{- if not (hasKey $memo $key) -}}
{{- $salt := printf "%s/%s" .root.Release.Namespace .root.Release.Name -}}
{{- $_ := set $memo $key (derivePassword 1 "maximum" .password $salt "agent-orchestrator-rollout" | sha256sum) -}}
{{- end -}}
{{- index $memo $key -}}
{{- end -}}

{{/* Pod annotations that roll pods when their configuration changes. */}}
{{- define "ao.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- /* secrets.yaml holds auth.secret and the inline external URLs as given: with one of them
set, its plain digest would be a dictionary target too (the rest of the text is known). */}}
{{- $secrets := include (print .Template.BasePath "/secrets.yaml") . }}
{{- if or .Values.auth.secret .Values.externalRedis.url .Values.externalDatabase.url }}
checksum/secret: {{ include "ao.passwordDigest" (dict "root" . "password" $secrets) }}
{{- else }}
checksum/secret: {{ $secrets | sha256sum }}
{{- end }}
{{- /* The in-chart datastores' Secrets hold the URLs with the passwords set here (a
generated one is kept across upgrades, so it never changes). */}}
{{- if or .Values.redis.password .Values.postgresql.password }}
checksum/datastores: {{ include "ao.passwordDigest" (dict "root" . "password" (print .Values.redis.password "/" .Values.postgresql.password)) }}
{{- end }}
{{- end -}}

{{/*
The env of the `orchestrator prune` CronJob's container (the rest comes from the settings
ConfigMap, like the long-running components): the database URL and no OpenTelemetry, as for
migrations.
*/}}
{{- define "ao.pruneEnv" -}}
- name: ORCHESTRATOR_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "ao.databaseSecret" . }}
      key: {{ include "ao.databaseSecretKey" . }}
- name: OTEL_SDK_DISABLED
  value: "true"
{{- end -}}

{{/*
Every env name the chart sets itself on a container that also reads the settings ConfigMap
(api, worker, executor, operator, prune), whatever the values: `env` wins over `envFrom`, so the
same name in config.extraEnv would never reach the process. ao.validate adds what ao.env renders
for the values at hand, so a name added there is refused even before it is listed here.
*/}}
{{- define "ao.reservedEnv" -}}
{{- list
  "ORCHESTRATOR_POD_NAME" "POD_NAMESPACE" "POD_ID"
  "ORCHESTRATOR_REDIS_URL" "ORCHESTRATOR_DATABASE_URL"
  "ORCHESTRATOR_JWT_SECRET" "ORCHESTRATOR_JWT_PREVIOUS_SECRET" "ORCHESTRATOR_JWT_PUBLIC_KEY"
  "KEDA_REDIS_PASSWORD"
  "OTEL_SERVICE_NAME" "OTEL_SDK_DISABLED" "OTEL_EXPORTER_OTLP_ENDPOINT"
  "OTEL_EXPORTER_OTLP_PROTOCOL" "OTEL_TRACES_SAMPLER" "OTEL_TRACES_SAMPLER_ARG"
  "OTEL_RESOURCE_ATTRIBUTES"
  "ORCHESTRATOR_OPERATOR_NAMESPACES" "ORCHESTRATOR_OPERATOR_PEERING"
  "ORCHESTRATOR_OPERATOR_PEERING_NAME" "ORCHESTRATOR_OPERATOR_LIVENESS_PORT"
  "ORCHESTRATOR_OPERATOR_REFRESH_SECONDS"
  | toJson -}}
{{- end -}}

{{/* Topology spread over zones and nodes. Call with (dict "root" $ "component" "api"). */}}
{{- define "ao.topologySpread" -}}
{{- $spread := index .root.Values .component "topologySpread" -}}
{{- if $spread.enabled }}
topologySpreadConstraints:
{{- range $spread.topologyKeys }}
  - maxSkew: {{ $spread.maxSkew }}
    topologyKey: {{ . }}
    whenUnsatisfiable: {{ $spread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
{{ include "ao.selectorLabels" $ | indent 8 }}
    matchLabelKeys:
      - pod-template-hash
{{- end }}
{{- end }}
{{- end -}}

{{/* Scheduling knobs shared by every component. Call with the component's values. */}}
{{- define "ao.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* Probes on the metrics port for processes without an HTTP API (worker, executor). */}}
{{- define "ao.metricsProbes" -}}
startupProbe:
  httpGet:
    path: /metrics
    port: metrics
  periodSeconds: {{ .startup.periodSeconds }}
  timeoutSeconds: {{ .startup.timeoutSeconds }}
  failureThreshold: {{ .startup.failureThreshold }}
readinessProbe:
  httpGet:
    path: /metrics
    port: metrics
  periodSeconds: {{ .readiness.periodSeconds }}
  timeoutSeconds: {{ .readiness.timeoutSeconds }}
  failureThreshold: {{ .readiness.failureThreshold }}
  successThreshold: {{ .readiness.successThreshold }}
livenessProbe:
  tcpSocket:
    port: metrics
  periodSeconds: {{ .liveness.periodSeconds }}
  timeoutSeconds: {{ .liveness.timeoutSeconds }}
  failureThreshold: {{ .liveness.failureThreshold }}
{{- end -}}

{{/* Whether a Prometheus Operator kind may be rendered: API present, or forced. */}}
{{- define "ao.monitoringApi" -}}
{{- if or .force (.root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" .kind)) -}}true{{- end -}}
{{- end -}}

{{/* Guards: configurations that cannot work fail the render with one clear line. */}}
{{- define "ao.validate" -}}
{{- $v := .Values -}}
{{- $extraVolumes := list -}}
{{- range $v.extraVolumes }}{{ $extraVolumes = append $extraVolumes .name }}{{ end -}}
{{- range $v.extraVolumeMounts -}}
{{- if not (has .name $extraVolumes) -}}
{{- fail (printf "extraVolumeMounts: %s is not in extraVolumes" .name) -}}
{{- end -}}
{{- end -}}
{{- /* A key the chart writes itself, given again, renders twice in one mapping: Helm keeps the
user's (a pod template that no longer matches its selector, a checksum that never rolls the
pods), stricter YAML readers (kustomize, Flux) refuse the manifest. */}}
{{- $chartLabels := list "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/component" "app.kubernetes.io/version" "app.kubernetes.io/part-of" "app.kubernetes.io/managed-by" "helm.sh/chart" -}}
{{- range $key, $_ := $v.commonLabels -}}
{{- if has $key $chartLabels -}}
{{- fail (printf "commonLabels.%s is a label the chart sets itself: use another key" $key) -}}
{{- end -}}
{{- end -}}
{{- range $component := list "api" "worker" "executor" "operator" -}}
{{- range $key, $_ := (index $v $component).podLabels -}}
{{- if or (has $key $chartLabels) (hasKey ($v.commonLabels | default dict) $key) -}}
{{- fail (printf "%s.podLabels.%s is a label the chart (or commonLabels) sets already: use another key" $component $key) -}}
{{- end -}}
{{- end -}}
{{- range $key, $_ := (index $v $component).podAnnotations -}}
{{- if hasPrefix "checksum/" $key -}}
{{- fail (printf "%s.podAnnotations.%s: checksum/* annotations are the chart's own (they roll the pods when the settings or Secrets change)" $component $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not (has $v.autoscaling.mode (list "none" "hpa" "keda")) -}}
{{- fail (printf "autoscaling.mode must be one of none, hpa, keda (got %q): the HPA and KEDA modes are mutually exclusive" $v.autoscaling.mode) -}}
{{- end -}}
{{- if not (has $v.exposure.mode (list "none" "ingress" "gateway")) -}}
{{- fail (printf "exposure.mode must be one of none, ingress, gateway (got %q)" $v.exposure.mode) -}}
{{- end -}}
{{- if and $v.redis.enabled (or $v.externalRedis.url $v.externalRedis.existingSecret) -}}
{{- fail "redis.enabled and externalRedis are mutually exclusive: disable the in-chart Redis to use an external one" -}}
{{- end -}}
{{- if and $v.redis.enabled (ne $v.externalRedis.mode "standalone") -}}
{{- fail "the in-chart Redis is a single node: externalRedis.mode must stay standalone with redis.enabled" -}}
{{- end -}}
{{- if and (not $v.redis.enabled) (eq $v.externalRedis.mode "sentinel") (not $v.externalRedis.sentinels) -}}
{{- fail "externalRedis.sentinels is required when externalRedis.mode is sentinel" -}}
{{- end -}}
{{- if and (not $v.redis.enabled) (ne $v.externalRedis.mode "sentinel") (not (or $v.externalRedis.url $v.externalRedis.existingSecret)) -}}
{{- fail "Redis is required: set redis.enabled=true (evaluation) or externalRedis.url / externalRedis.existingSecret" -}}
{{- end -}}
{{- if and $v.postgresql.enabled (or $v.externalDatabase.url $v.externalDatabase.existingSecret) -}}
{{- fail "postgresql.enabled and externalDatabase are mutually exclusive: disable the in-chart PostgreSQL to use an external one" -}}
{{- end -}}
{{- if and (include "ao.jwtUsesPublicKey" .) (not (or $v.auth.publicKey $v.auth.existingSecret $v.auth.jwksUrl)) -}}
{{- fail (printf "auth.algorithm %s needs auth.publicKey, auth.existingSecret (holding the public key) or auth.jwksUrl" $v.auth.algorithm) -}}
{{- end -}}
{{- /* The ingress answers a body over its limit itself (an HTML 413 a page cannot read):
it must take every body the api accepts (ORCHESTRATOR_MAX_BODY_BYTES, 512 KiB by default),
so that only the api refuses one, with its JSON 413 `payload_too_large`. */ -}}
{{- $bodyLimit := toString (index $v.exposure.ingress.annotations "nginx.ingress.kubernetes.io/proxy-body-size" | default "") -}}
{{- if and (eq $v.exposure.mode "ingress") (eq $v.exposure.ingress.className "nginx") $bodyLimit (ne $bodyLimit "0") -}}
{{- $unit := lower (regexFind "[kKmMgG]$" $bodyLimit) -}}
{{- $ingressBytes := mul (int (regexFind "^[0-9]+" $bodyLimit)) (get (dict "k" 1024 "m" 1048576 "g" 1073741824 "" 1) $unit) -}}
{{- $apiBytes := int (get $v.config.extraEnv "ORCHESTRATOR_MAX_BODY_BYTES" | default 524288) -}}
{{- range $v.api.extraEnv }}{{ if and (eq .name "ORCHESTRATOR_MAX_BODY_BYTES") .value }}{{ $apiBytes = int .value }}{{ end }}{{ end -}}
{{- if lt $ingressBytes $apiBytes -}}
{{- fail (printf "exposure.ingress.annotations nginx.ingress.kubernetes.io/proxy-body-size (%s = %d bytes) is below ORCHESTRATOR_MAX_BODY_BYTES (%d): the ingress would refuse, with its own HTML 413, bodies the api accepts; raise it" $bodyLimit $ingressBytes $apiBytes) -}}
{{- end -}}
{{- end -}}
{{- if and $v.auth.jwksUrl (not (include "ao.jwtUsesPublicKey" .)) -}}
{{- fail (printf "auth.jwksUrl: a key set holds public keys; auth.algorithm %s verifies with a shared secret (set it to the provider's RS* or ES*)" $v.auth.algorithm) -}}
{{- end -}}
{{- if not (hasKey $v.tiers $v.config.defaultTier) -}}
{{- fail (printf "config.defaultTier %q is not a tier in `tiers`" $v.config.defaultTier) -}}
{{- end -}}
{{- if ge (int $v.api.autoscaling.targetConnectionsPerPod) (int $v.config.maxWebsocketConnections) -}}
{{- fail "api.autoscaling.targetConnectionsPerPod must be below config.maxWebsocketConnections, or pods reach the cap before the HPA adds more" -}}
{{- end -}}
{{- if gt (int $v.api.autoscaling.minReplicas) (int $v.api.autoscaling.maxReplicas) -}}
{{- fail "api.autoscaling.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- if gt (int $v.worker.autoscaling.minReplicas) (int $v.worker.autoscaling.maxReplicas) -}}
{{- fail "worker.autoscaling.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- if and (eq $v.autoscaling.mode "keda") (not $v.redis.enabled) (not $v.autoscaling.keda.redisAddress) -}}
{{- fail "autoscaling.keda.redisAddress is required with an external Redis (KEDA reads the stream lag itself)" -}}
{{- end -}}
{{- /* The api pod serves HTTP on api.port and metrics on config.metricsPort (two servers:
the second cannot bind), and its Service exposes api.service.port and config.metricsPort (the
API server refuses two equal ports). */ -}}
{{- if eq (int $v.api.port) (int $v.config.metricsPort) -}}
{{- fail (printf "api.port and config.metricsPort must differ (both %d): the api's HTTP and metrics servers cannot share a port" (int $v.api.port)) -}}
{{- end -}}
{{- if eq (int $v.api.service.port) (int $v.config.metricsPort) -}}
{{- fail (printf "api.service.port and config.metricsPort must differ (both %d): the api Service exposes both" (int $v.api.service.port)) -}}
{{- end -}}
{{- /* A new tier has no built-in limits to fall back on (services/core/tiers.py): every pod
would exit at start on the tiers file. requestsPerMinutePerSession defaults to
ORCHESTRATOR_MAX_REQUESTS_PER_SESSION, allowedAgents to every agent. */ -}}
{{- $limits := list "requestsPerMinutePerTenant" "maxConnections" "tokensPerDay" "maxMessageChars" "streaming" "priority" "taskTimeoutSeconds" -}}
{{- range $tier, $set := $v.tiers -}}
{{- if not (has $tier (list "free" "pro" "enterprise")) -}}
{{- $missing := list -}}
{{- range $limits -}}
{{- if not (hasKey (default dict $set) .) -}}
{{- $missing = append $missing . -}}
{{- end -}}
{{- end -}}
{{- if $missing -}}
{{- fail (printf "tiers.%s is a new tier: it must set every limit (missing: %s)" $tier (join ", " $missing)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq $v.exposure.mode "gateway") (not $v.exposure.gateway.parentRefs) -}}
{{- fail "exposure.gateway.parentRefs is required when exposure.mode is gateway" -}}
{{- end -}}
{{- /* A component's extraEnv must not repeat a name the chart sets on that container: Helm 4
applies server-side, which refuses duplicate env names (KUBERNETES.md). */ -}}
{{- $reserved := include "ao.reservedEnv" . | fromJsonArray -}}
{{- range (include "ao.pruneEnv" . | fromYamlArray) -}}
{{- $reserved = append $reserved .name -}}
{{- end -}}
{{- range $component := list "api" "worker" "executor" "operator" -}}
{{- $set := list -}}
{{- range (include "ao.env" (dict "root" $ "component" $component) | fromYamlArray) -}}
{{- $set = append $set .name -}}
{{- end -}}
{{- $reserved = concat $reserved $set -}}
{{- range (index $v $component).extraEnv -}}
{{- if has .name $set -}}
{{- fail (printf "%s.extraEnv: %s is already set by the chart" $component .name) -}}
{{- end -}}
{{- /* `env` wins over the settings ConfigMap: one of these, overridden for one container,
would part the process from the objects the chart derived from it (ports, Service and
preStop hook, grace period, tiers mount, autoscaling, Redis topology, RBAC). */ -}}
{{- if has .name (list "ORCHESTRATOR_METRICS_PORT" "ORCHESTRATOR_DRAIN_SECONDS" "ORCHESTRATOR_TIERS_FILE" "ORCHESTRATOR_CALLBACK_PARTITIONS" "ORCHESTRATOR_REDIS_MODE" "ORCHESTRATOR_REDIS_SENTINELS" "ORCHESTRATOR_REDIS_SENTINEL_MASTER" "ORCHESTRATOR_MAX_WEBSOCKET_CONNECTIONS" "ORCHESTRATOR_OPERATOR_NAMESPACES") -}}
{{- fail (printf "%s.extraEnv: %s is wired by the chart into other objects: set it through its value (docs/kubernetes.md, values table)" $component .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $name, $value := $v.config.extraEnv -}}
{{- if or (has $name $reserved) (hasKey (include "ao.settingsEnv" $ | fromYaml) $name) -}}
{{- fail (printf "config.extraEnv.%s is already set by the chart: use its value instead" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
A value from values as the text of an env var or a config file entry. Helm reads every YAML
number as float64, which `quote`/`toString` print in exponent form from 1e6 on (2e+06): an
integer setting written so passes the values schema, then every pod refuses it at start (and
KEDA cannot parse it). Go's JSON encoding prints a float64 without exponent below 1e21
(2000000, 0.5, 1234567.5); strings and booleans keep `toString`, a missing value stays empty.
Call with the value: (include "ao.text" .Values.config.maxWebsocketConnections | quote).
*/}}
{{- define "ao.text" -}}
{{- if or (kindIs "float64" .) (kindIs "float32" .) (kindIs "int64" .) (kindIs "int" .) -}}
{{- toJson . -}}
{{- else if not (kindIs "invalid" .) -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* The ORCHESTRATOR_* settings of the ConfigMap, as a YAML map (without config.extraEnv). */}}
{{- define "ao.settingsEnv" -}}
{{- $v := .Values -}}
ORCHESTRATOR_LOG_LEVEL: {{ $v.config.logLevel | quote }}
ORCHESTRATOR_DEFAULT_TIER: {{ $v.config.defaultTier | quote }}
ORCHESTRATOR_ALLOWED_ORIGINS: {{ join "," $v.config.allowedOrigins | quote }}
ORCHESTRATOR_MAX_WEBSOCKET_CONNECTIONS: {{ include "ao.text" $v.config.maxWebsocketConnections | quote }}
ORCHESTRATOR_WEBSOCKET_PING_INTERVAL: {{ include "ao.text" $v.config.websocketPingInterval | quote }}
ORCHESTRATOR_WEBSOCKET_PING_TIMEOUT: {{ include "ao.text" $v.config.websocketPingTimeout | quote }}
ORCHESTRATOR_WEBSOCKET_COMPRESSION: {{ $v.config.websocketCompression | quote }}
ORCHESTRATOR_CALLBACK_PARTITIONS: {{ include "ao.text" $v.config.callbackPartitions | quote }}
ORCHESTRATOR_HISTORY_RETENTION_DAYS: {{ include "ao.text" $v.config.historyRetentionDays | quote }}
ORCHESTRATOR_VALIDATION_CACHE_TTL: {{ include "ao.text" $v.config.validationCacheTtl | quote }}
ORCHESTRATOR_METRICS_PORT: {{ include "ao.text" $v.config.metricsPort | quote }}
ORCHESTRATOR_DRAIN_SECONDS: {{ include "ao.text" $v.api.drain.seconds | quote }}
ORCHESTRATOR_TIERS_FILE: /etc/agent-orchestrator/tiers.json
ORCHESTRATOR_EXECUTOR_CONCURRENCY: {{ include "ao.text" $v.executor.concurrency | quote }}
ORCHESTRATOR_EXECUTOR_CHUNK_DELAY_MS: {{ include "ao.text" $v.executor.chunkDelayMs | quote }}
{{- if $v.redis.enabled }}
ORCHESTRATOR_REDIS_MODE: "standalone"
{{- else }}
ORCHESTRATOR_REDIS_MODE: {{ $v.externalRedis.mode | quote }}
{{- if eq $v.externalRedis.mode "sentinel" }}
ORCHESTRATOR_REDIS_SENTINELS: {{ join "," $v.externalRedis.sentinels | quote }}
ORCHESTRATOR_REDIS_SENTINEL_MASTER: {{ $v.externalRedis.sentinelMaster | quote }}
{{- end }}
{{- end }}
ORCHESTRATOR_REDIS_MAX_CONNECTIONS: {{ include "ao.text" $v.externalRedis.maxConnections | quote }}
ORCHESTRATOR_JWT_ALGORITHM: {{ $v.auth.algorithm | quote }}
{{- with $v.auth.audience }}
ORCHESTRATOR_JWT_AUDIENCE: {{ . | quote }}
{{- end }}
{{- with $v.auth.issuer }}
ORCHESTRATOR_JWT_ISSUER: {{ . | quote }}
{{- end }}
{{- with $v.auth.jwksUrl }}
ORCHESTRATOR_JWT_JWKS_URL: {{ . | quote }}
ORCHESTRATOR_JWT_JWKS_REFRESH_SECONDS: {{ include "ao.text" $v.auth.jwksRefreshSeconds | quote }}
{{- end }}
{{- end -}}

{{/*
The namespaces the operator watches, as a JSON array: [] with operator.clusterWide (every
namespace: ClusterRole, ClusterKopfPeering, ORCHESTRATOR_OPERATOR_NAMESPACES empty), else
operator.watchNamespaces or the release namespace (a Role and a KopfPeering in each). The
two settings contradict each other when both are set: fail instead of ignoring one.
*/}}
{{- define "ao.operatorNamespaces" -}}
{{- $operator := .Values.operator -}}
{{- if $operator.clusterWide -}}
{{- if $operator.watchNamespaces -}}
{{- fail "operator.clusterWide watches every namespace: leave operator.watchNamespaces empty" -}}
{{- end -}}
{{- list | toJson -}}
{{- else -}}
{{- $operator.watchNamespaces | default (list .Release.Namespace) | uniq | toJson -}}
{{- end -}}
{{- end -}}

{{/*
Egress ports as a JSON list of strings: `ports` (networkPolicy.*.ports) and the port of each of
`addresses` the chart was given inline (a URL, or host:port; a URL without a port takes its
scheme's entry in `defaults`). A datastore on a port the list lacks (TLS Redis on 6380,
PgBouncer on 6432) would otherwise be unreachable from every pod, and nothing says why.
Call with (dict "ports" list "addresses" list "defaults" dict).
*/}}
{{- define "ao.egressPorts" -}}
{{- $ports := list -}}
{{- range .ports }}{{ $ports = append $ports (toString (int .)) }}{{ end -}}
{{- $defaults := .defaults -}}
{{- range $address := .addresses -}}
{{- if $address -}}
{{- $hosts := $address -}}
{{- $scheme := "" -}}
{{- if contains "://" $address -}}
{{- $url := urlParse $address -}}
{{- $hosts = $url.host -}}
{{- $scheme = $url.scheme -}}
{{- end -}}
{{- range $host := splitList "," $hosts -}}
{{- $port := "" -}}
{{- if regexMatch ":[0-9]+$" $host -}}
{{- $port = regexFind "[0-9]+$" $host -}}
{{- else if $host -}}
{{- $port = get $defaults $scheme -}}
{{- end -}}
{{- if and $port (not (has $port $ports)) }}{{ $ports = append $ports $port }}{{ end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $ports | toJson -}}
{{- end -}}
