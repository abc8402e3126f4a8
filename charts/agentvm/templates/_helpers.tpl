{{/* Name of the chart's objects: the release name, or "agentvm" when the release is named so. */}}
{{- define "agentvm.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object of the release carries. */}}
{{- define "agentvm.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector of the webhook pods. */}}
{{- define "agentvm.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end -}}

{{/* Image of the webhook. */}}
{{- define "agentvm.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Image of the sidecar binary (proxy, exec server, dispatcher). */}}
{{- define "agentvm.sidecarImage" -}}
{{ .Values.sidecar.repository }}:{{ .Values.sidecar.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Name of the Secret holding the serving certificate. */}}
{{- define "agentvm.certSecret" -}}
{{ include "agentvm.fullname" . }}-tls
{{- end -}}

{{/* Hardened container security context, as the webhook gives agent pods. */}}
{{- define "agentvm.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Namespaces the webhook never sees: the configured ones and the release namespace. */}}
{{- define "agentvm.excludedNamespaces" -}}
{{- $all := append .Values.webhook.excludedNamespaces .Release.Namespace | uniq -}}
{{- toJson $all -}}
{{- end -}}

{{/* An object name as a quoted YAML string, or null when empty. */}}
{{- define "agentvm.nameOrNull" -}}
{{- if . }}{{ . | quote }}{{ else }}null{{ end -}}
{{- end -}}

{{/* Settings for the policies, from the values (policies/README.md lists them). */}}
{{- define "agentvm.settings" -}}
agentvm_settings:
  excluded_namespaces: {{ include "agentvm.excludedNamespaces" . }}
  credentials: {{ .Values.settings.credentials }}
  read_only_root_filesystem: {{ .Values.settings.readOnlyRootFilesystem }}
  runtime_class: {{ if .Values.settings.runtimeClass }}{{ .Values.settings.runtimeClass | quote }}{{ else }}null{{ end }}
  allowed_profiles: {{ toJson .Values.settings.allowedProfiles }}
  proxy:
    image: {{ include "agentvm.sidecarImage" . | quote }}
    config_map: {{ include "agentvm.nameOrNull" .Values.proxy.configMap }}
    policy_config_map: {{ include "agentvm.nameOrNull" .Values.proxy.policyConfigMap }}
    credentials_secret: {{ include "agentvm.nameOrNull" .Values.proxy.credentialsSecret }}
    workload_config_map: {{ .Values.proxy.workloadConfigMap }}
    workload_credentials_secret: {{ .Values.proxy.workloadCredentialsSecret }}
  exec:
    image: {{ include "agentvm.sidecarImage" . | quote }}
  exec_endpoints:
    exec_pod: "http://agentvm-exec.{namespace}.svc:7412"
    dispatcher: "http://agentvm-dispatcher.{namespace}.svc:7412"
  network:
    manage_network_policy: true
    cluster_dns: {{ .Values.egress.clusterDNS }}
    allowed_cidrs: {{ toJson .Values.egress.allowedCIDRs }}
  debug:
    allow_ephemeral_containers: {{ .Values.settings.allowEphemeralContainers }}
    connect_allowed_groups: {{ toJson .Values.webhook.connectAllowedGroups }}
    connect_unknown_pod: {{ .Values.webhook.connectUnknownPod }}
{{- end -}}

{{/* Fields shared by every webhook entry. */}}
{{- define "agentvm.webhookCommon" -}}
admissionReviewVersions: ["v1"]
sideEffects: NoneOnDryRun
matchPolicy: Equivalent
timeoutSeconds: {{ .timeout }}
clientConfig:
  {{- if .caBundle }}
  caBundle: {{ .caBundle }}
  {{- end }}
  service:
    name: {{ .name }}
    namespace: {{ .ns }}
    path: {{ .path }}
    port: 443
namespaceSelector:
  {{- if .enforced }}
  matchLabels:
    agentvm.dev/enforce: "true"
  {{- end }}
  matchExpressions:
    - key: kubernetes.io/metadata.name
      operator: NotIn
      values: {{ .excluded }}
{{- end -}}

{{/* Rules for the workload kinds whose pod template the webhook locks down. */}}
{{- define "agentvm.workloadRules" -}}
- apiGroups: ["apps"]
  apiVersions: ["v1"]
  operations: ["CREATE", "UPDATE"]
  resources: ["deployments", "replicasets", "statefulsets", "daemonsets"]
  scope: Namespaced
- apiGroups: ["batch"]
  apiVersions: ["v1"]
  operations: ["CREATE", "UPDATE"]
  resources: ["jobs", "cronjobs"]
  scope: Namespaced
- apiGroups: [""]
  apiVersions: ["v1"]
  operations: ["CREATE", "UPDATE"]
  resources: ["replicationcontrollers"]
  scope: Namespaced
{{- end -}}
