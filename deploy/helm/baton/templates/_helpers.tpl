{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "baton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* RELEASE-baton, or RELEASE alone when it already contains the chart's name. */}}
{{- define "baton.fullname" -}}
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

{{/* A component's resource name: (dict "root" $ "component" "decode") */}}
{{- define "baton.componentName" -}}
{{- printf "%s-%s" (include "baton.fullname" .root | trunc 50 | trimSuffix "-") .component }}
{{- end }}

{{- define "baton.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels: (dict "root" $ "component" "decode") */}}
{{- define "baton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baton.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "baton.labels" -}}
helm.sh/chart: {{ include "baton.chart" .root }}
{{ include "baton.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: baton
{{- end }}

{{- define "baton.plannerServiceAccountName" -}}
{{- default (include "baton.componentName" (dict "root" . "component" "planner")) .Values.planner.serviceAccount.name }}
{{- end }}

{{/* NATS --------------------------------------------------------------------------------- */}}

{{/* Every server of the bundled NATS by its pod's stable DNS name, comma-separated (the services
try them in turn and move to another when theirs goes away); an external NATS as given. */}}
{{- define "baton.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- $scheme := ternary "tls" "nats" (not (empty .Values.natsTls.existingSecret)) }}
{{- $name := include "baton.componentName" (dict "root" . "component" "nats") }}
{{- $urls := list }}
{{- range $i := until (int .Values.nats.replicas) }}
{{- $urls = append $urls (printf "%s://%s-%d.%s-headless.%s.svc:4222" $scheme $name $i $name $.Release.Namespace) }}
{{- end }}
{{- join "," $urls }}
{{- else }}
{{- required "externalNats.url is required when nats.enabled is false" .Values.externalNats.url }}
{{- end }}
{{- end }}

{{/* Checks that no single template owns. */}}
{{- /* "true" when the chart's per-role NATS identities are in force: the bundled NATS, no shared
user/token/.creds configured, and no explicit natsAuth.insecureNoAuth. */}}
{{- define "baton.natsRoles" -}}
{{- $a := .Values.natsAuth }}
{{- and .Values.nats.enabled (not $a.insecureNoAuth) (not (or $a.userKey $a.tokenKey $a.credsKey)) | toString }}
{{- end }}

{{- define "baton.natsIdentitiesSecret" -}}
{{ include "baton.componentName" (dict "root" . "component" "nats-identities") }}
{{- end }}

{{- /* One role's credentials file from the identities Secret: env, volume, mount. */}}
{{- define "baton.roleCredsEnv" -}}
{{- if eq (include "baton.natsRoles" .root) "true" }}
- name: BATON_NATS_CREDS
  value: /etc/baton/nats-identity/{{ .component }}.creds
{{- end }}
{{- end }}
{{- define "baton.roleCredsVolume" -}}
{{- if eq (include "baton.natsRoles" .root) "true" }}
- name: nats-identity
  secret:
    secretName: {{ include "baton.natsIdentitiesSecret" .root }}
    defaultMode: 0400
    items: [{key: {{ printf "%s.creds" .component | quote }}, path: {{ printf "%s.creds" .component | quote }}}]
{{- end }}
{{- end }}
{{- define "baton.roleCredsMount" -}}
{{- if eq (include "baton.natsRoles" .root) "true" }}
- name: nats-identity
  mountPath: /etc/baton/nats-identity
  readOnly: true
{{- end }}
{{- end }}

{{- define "baton.validate" -}}
{{- $a := .Values.natsAuth }}
{{- if and (or $a.userKey $a.passwordKey $a.tokenKey $a.credsKey) (not $a.existingSecret) }}
{{- fail "natsAuth: userKey/passwordKey/tokenKey/credsKey name entries of natsAuth.existingSecret; set it" }}
{{- end }}
{{- if and $a.userKey (not $a.passwordKey) }}
{{- fail "natsAuth: userKey needs passwordKey" }}
{{- end }}
{{- if and .Values.nats.enabled $a.credsKey }}
{{- fail "natsAuth.credsKey (decentralised JWT auth) needs an operator-configured NATS: set nats.enabled=false and externalNats.url" }}
{{- end }}
{{- if and .Values.nats.enabled .Values.nats.tls.existingSecret (not .Values.natsTls.existingSecret) }}
{{- fail "nats.tls.existingSecret makes the bundled NATS require TLS: set natsTls.existingSecret (at least its ca.crt) for the services" }}
{{- end }}
{{- if and .Values.nats.enabled .Values.natsTls.existingSecret (not .Values.nats.tls.existingSecret) }}
{{- fail "natsTls.existingSecret: the bundled NATS serves TLS only with nats.tls.existingSecret" }}
{{- end }}
{{- if and .Values.nats.tls.verifyClients (not (and .Values.natsTls.certKey .Values.natsTls.keyKey)) }}
{{- fail "nats.tls.verifyClients: the services need a client certificate (natsTls.certKey and natsTls.keyKey)" }}
{{- end }}
{{- if and (not .Values.nats.enabled) (not (or $a.userKey $a.tokenKey $a.credsKey $a.insecureNoAuth)) }}
{{- fail "externalNats: the services need credentials (natsAuth.credsKey, userKey+passwordKey or tokenKey), or natsAuth.insecureNoAuth=true for a development NATS without authentication" }}
{{- end }}
{{- if not (has .Values.planner.connector (list "kubernetes" "none")) }}
{{- fail "planner.connector: kubernetes or none (local and compose do not apply in a cluster)" }}
{{- end }}
{{- end }}

{{/* True (non-empty) when the planner owns the worker Deployments' replicas. */}}
{{- define "baton.plannerScales" -}}
{{- if and .Values.planner.enabled (eq .Values.planner.connector "kubernetes") (not .Values.planner.dryRun) }}true{{ end }}
{{- end }}

{{/* A value as a string, whole numbers without the float formatting (2097152, not 2.097152e+06). */}}
{{- define "baton.str" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) }}{{ int64 . }}{{ else }}{{ toString . }}{{ end }}
{{- end }}

{{/* Pod spec pieces ------------------------------------------------------------------------ */}}

{{/* image: (dict "root" $ "values" .Values.decode "base" .Values.image) */}}
{{- define "baton.image" -}}
{{- $img := merge (deepCopy (default dict .values.image)) .base }}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion $img.tag | toString) }}
{{- end }}

{{- define "baton.imagePullPolicy" -}}
{{- $img := merge (deepCopy (default dict .values.image)) .base }}
{{- $img.pullPolicy }}
{{- end }}

{{/* Environment every Baton service gets: NATS, its credentials and TLS, logging, tracing. */}}
{{/* nats-server --routes: (dict "name" ... "headless" ... "replicas" 3 "namespace" ...) */}}
{{- define "baton.natsRoutes" -}}
{{- $routes := list }}
{{- range $i := until (int .replicas) }}
{{- $routes = append $routes (printf "nats://%s-%d.%s.%s.svc:6222" $.name $i $.headless $.namespace) }}
{{- end }}
{{- join "," $routes }}
{{- end }}

{{/* JetStream replicas for the streams and buckets Baton creates: the bundled cluster's size, or
externalNats.jsReplicas. */}}
{{- define "baton.jsReplicas" -}}
{{- if .Values.nats.enabled }}{{ int .Values.nats.replicas }}{{ else }}{{ int .Values.externalNats.jsReplicas }}{{ end }}
{{- end }}

{{- define "baton.commonEnv" -}}
{{- $root := .root -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: BATON_NATS_URL
  value: {{ include "baton.natsUrl" $root | quote }}
- name: BATON_JS_REPLICAS
  value: {{ include "baton.jsReplicas" $root | quote }}
- name: BATON_LOG_LEVEL
  value: {{ $root.Values.logLevel | quote }}
{{- with $root.Values.natsAuth }}
{{- if .userKey }}
- name: BATON_NATS_USER
  valueFrom: {secretKeyRef: {name: {{ .existingSecret | quote }}, key: {{ .userKey | quote }}}}
- name: BATON_NATS_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ .existingSecret | quote }}, key: {{ .passwordKey | quote }}}}
{{- end }}
{{- if .tokenKey }}
- name: BATON_NATS_TOKEN
  valueFrom: {secretKeyRef: {name: {{ .existingSecret | quote }}, key: {{ .tokenKey | quote }}}}
{{- end }}
{{- if .credsKey }}
- name: BATON_NATS_CREDS
  value: /etc/baton/nats-creds/{{ .credsKey }}
{{- end }}
{{- end }}
{{- with $root.Values.natsTls }}
{{- if .existingSecret }}
{{- if .caKey }}
- name: BATON_NATS_TLS_CA
  value: /etc/baton/nats-tls/{{ .caKey }}
{{- end }}
{{- if .certKey }}
- name: BATON_NATS_TLS_CERT
  value: /etc/baton/nats-tls/{{ .certKey }}
- name: BATON_NATS_TLS_KEY
  value: /etc/baton/nats-tls/{{ required "natsTls.keyKey goes with natsTls.certKey" .keyKey }}
{{- end }}
{{- end }}
{{- end }}
{{- with $root.Values.tracing }}
{{- if .otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .otlpEndpoint | quote }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),service.instance.id=$(POD_NAME)"
{{- if .sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .sampler | quote }}
{{- end }}
{{- if .samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ include "baton.str" .samplerArg | quote }}
{{- end }}
{{- range $k, $v := .env }}
- name: {{ $k }}
  value: {{ include "baton.str" $v | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The model the frontend and the workers agree on. */}}
{{- define "baton.modelEnv" -}}
- name: BATON_MODEL
  value: {{ .Values.model | quote }}
{{- if .Values.servedModelName }}
- name: BATON_SERVED_MODEL_NAME
  value: {{ .Values.servedModelName | quote }}
{{- end }}
{{- end }}

{{/* KV transfer TLS (kvTls): env, volume and mount for decode and prefill pods; empty when off. */}}
{{- define "baton.kvTlsEnv" -}}
{{- with .Values.kvTls }}
{{- if .existingSecret }}
- name: BATON_KV_TLS_CERT
  value: /etc/baton/kv-tls/{{ required "kvTls.certKey" .certKey }}
- name: BATON_KV_TLS_KEY
  value: /etc/baton/kv-tls/{{ required "kvTls.keyKey" .keyKey }}
{{- if .caKey }}
- name: BATON_KV_TLS_CA
  value: /etc/baton/kv-tls/{{ .caKey }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- define "baton.kvTlsVolume" -}}
{{- if .Values.kvTls.existingSecret }}
- name: kv-tls
  secret:
    secretName: {{ .Values.kvTls.existingSecret }}
    defaultMode: 0400
{{- end }}
{{- end }}
{{- define "baton.kvTlsMount" -}}
{{- if .Values.kvTls.existingSecret }}
- name: kv-tls
  mountPath: /etc/baton/kv-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* Volumes for the NATS credentials and TLS Secrets (to go with baton.natsVolumeMounts). */}}
{{- define "baton.natsVolumes" -}}
{{- if .Values.natsAuth.credsKey }}
- name: nats-creds
  secret:
    secretName: {{ .Values.natsAuth.existingSecret }}
    items: [{key: {{ .Values.natsAuth.credsKey | quote }}, path: {{ .Values.natsAuth.credsKey | quote }}}]
{{- end }}
{{- if .Values.natsTls.existingSecret }}
- name: nats-tls
  secret:
    secretName: {{ .Values.natsTls.existingSecret }}
{{- end }}
{{- end }}

{{- define "baton.natsVolumeMounts" -}}
{{- if .Values.natsAuth.credsKey }}
- name: nats-creds
  mountPath: /etc/baton/nats-creds
  readOnly: true
{{- end }}
{{- if .Values.natsTls.existingSecret }}
- name: nats-tls
  mountPath: /etc/baton/nats-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* The prometheus.io/* scrape annotations: (dict "root" $ "port" 9090) */}}
{{- define "baton.scrapeAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/*
A Baton service's Deployment.
  (dict "root" $ "component" "decode" "values" .Values.decode "base" .Values.image
        "args" (list ...) "env" "<yaml list>" "port" 9090 "portName" "metrics"
        "replicas" true|false "recreate" true|false "serviceAccount" "name"
        "volumes" "<yaml>" "volumeMounts" "<yaml>")
*/}}
{{- define "baton.deployment" -}}
{{- $root := .root }}
{{- $v := .values }}
{{- $sel := dict "root" $root "component" .component }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "baton.componentName" $sel }}
  namespace: {{ $.root.Release.Namespace }}
  labels:
    {{- include "baton.labels" $sel | nindent 4 }}
spec:
  {{- if .replicas }}
  replicas: {{ $v.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "baton.selectorLabels" $sel | nindent 6 }}
  strategy:
    {{- if .recreate }}
    type: Recreate
    {{- else }}
    type: RollingUpdate
    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "baton.selectorLabels" $sel | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $ann := merge (deepCopy (default dict $v.podAnnotations)) (include "baton.scrapeAnnotations" (dict "root" $root "port" .port) | fromYaml) }}
      {{- with $ann }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- if .serviceAccount }}
      serviceAccountName: {{ .serviceAccount }}
      automountServiceAccountToken: true
      {{- else }}
      automountServiceAccountToken: false
      {{- end }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ .component }}
          image: {{ include "baton.image" (dict "root" $root "values" $v "base" .base) | quote }}
          imagePullPolicy: {{ include "baton.imagePullPolicy" (dict "root" $root "values" $v "base" .base) }}
          args:
            {{- range .args }}
            - {{ include "baton.str" . | quote }}
            {{- end }}
            {{- range $v.extraArgs }}
            - {{ include "baton.str" . | quote }}
            {{- end }}
          env:
            {{- include "baton.commonEnv" (dict "root" $root) | nindent 12 }}
            {{- with include "baton.roleCredsEnv" (dict "root" $root "component" .component) }}
            {{- . | trim | nindent 12 }}
            {{- end }}
            {{- if not (hasKey (default dict $v.env) "BATON_DRAIN_TIMEOUT") }}
            # On SIGTERM the service drains this long, then has 5 s of its grace period left to exit.
            - name: BATON_DRAIN_TIMEOUT
              value: {{ max 1 (sub (int $v.terminationGracePeriodSeconds) 5) | quote }}
            {{- end }}
            {{- with .env }}
            {{- . | trim | nindent 12 }}
            {{- end }}
            {{- range $k, $val := $v.env }}
            - name: {{ $k }}
              value: {{ include "baton.str" $val | quote }}
            {{- end }}
          ports:
            - name: {{ .portName }}
              containerPort: {{ .port }}
              protocol: TCP
          {{- with $v.probes.startup }}
          startupProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $v.probes.readiness }}
          readinessProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $v.probes.liveness }}
          livenessProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            # The torch engine builds its CPU kernels on first start; the rest of the cache is baked in.
            - name: kernels
              mountPath: /opt/baton/cache/kernels
            {{- with include "baton.roleCredsMount" (dict "root" $root "component" .component) }}
            {{- . | trim | nindent 12 }}
            {{- end }}
            {{- with include "baton.natsVolumeMounts" $root }}
            {{- . | trim | nindent 12 }}
            {{- end }}
            {{- with .volumeMounts }}
            {{- . | trim | nindent 12 }}
            {{- end }}
            {{- with $v.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir: {}
        - name: kernels
          emptyDir: {}
        {{- with include "baton.roleCredsVolume" (dict "root" $root "component" .component) }}
        {{- . | trim | nindent 8 }}
        {{- end }}
        {{- with include "baton.natsVolumes" $root }}
        {{- . | trim | nindent 8 }}
        {{- end }}
        {{- with .volumes }}
        {{- . | trim | nindent 8 }}
        {{- end }}
        {{- with $v.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- include "baton.placement" (dict "sel" $sel "values" $v) | nindent 6 }}
{{- end }}

{{/*
Where a component's pods go: (dict "sel" (dict "root" $ "component" "router") "values" $v).
  affinity set: as given. Else antiAffinity preferred/required: one pod per node (soft or hard).
  topologySpreadConstraints set: as given. Else topologySpread preferred/required: pods spread
  evenly over nodes (maxSkew 1; ScheduleAnyway or DoNotSchedule). "none" (or no key): nothing.
*/}}
{{- define "baton.placement" -}}
{{- $v := .values }}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (include "baton.selectorLabels" .sel | fromYaml)) }}
{{- if $v.affinity }}
affinity:
  {{- toYaml $v.affinity | nindent 2 }}
{{- else if eq (toString $v.antiAffinity) "preferred" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          {{- toYaml $term | nindent 10 }}
{{- else if eq (toString $v.antiAffinity) "required" }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - {{- toYaml $term | nindent 8 }}
{{- end }}
{{- if $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml $v.topologySpreadConstraints | nindent 2 }}
{{- else if has (toString $v.topologySpread) (list "preferred" "required") }}
topologySpreadConstraints:
  - maxSkew: 1
    whenUnsatisfiable: {{ ternary "DoNotSchedule" "ScheduleAnyway" (eq (toString $v.topologySpread) "required") }}
    {{- toYaml $term | nindent 4 }}
{{- end }}
{{- end }}

{{/* A PodDisruptionBudget: (dict "root" $ "component" "decode" "values" .Values.decode) */}}
{{- define "baton.pdb" -}}
{{- $sel := dict "root" .root "component" .component }}
{{- with .values.podDisruptionBudget }}
{{- if .enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "baton.componentName" $sel }}
  namespace: {{ $.root.Release.Namespace }}
  labels:
    {{- include "baton.labels" $sel | nindent 4 }}
spec:
  {{- if hasKey . "minAvailable" }}
  minAvailable: {{ .minAvailable }}
  {{- else }}
  maxUnavailable: {{ .maxUnavailable | default 1 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "baton.selectorLabels" $sel | nindent 6 }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret holding the NATS cluster's route password: the operator's (nats.routeAuth.existingSecret)
or the one the chart generates (templates/nats-routes.yaml). */}}
{{- define "baton.natsRouteSecret" -}}
{{- if .Values.nats.routeAuth.existingSecret }}{{ .Values.nats.routeAuth.existingSecret }}{{ else }}{{ include "baton.componentName" (dict "root" . "component" "nats-routes") }}{{ end }}
{{- end }}
