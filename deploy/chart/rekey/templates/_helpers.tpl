{{/*
Names. With the release called "rekey" (the documented install) every object is named exactly as the
kustomize install in deploy/ names it; tests/helm.rs compares the two.
*/}}
{{- define "rekey.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's objects: the release name if it already contains the chart's name, else <release>-rekey. */}}
{{- define "rekey.fullname" -}}
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

{{/* The Lease the replicas elect their leader on (in the release namespace): the release's name. */}}
{{- define "rekey.leaseName" -}}
{{- include "rekey.fullname" . }}
{{- end }}

{{- define "rekey.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rekey.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rekey.labels" -}}
{{ include "rekey.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* repository@digest, else repository:tag (tag defaults to the chart's appVersion). */}}
{{- define "rekey.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The cluster name, or rendering stops with what to set. */}}
{{- define "rekey.clusterName" -}}
{{- required "clusterName is required: set it to this cluster's name, the value IAM users' consent tag rekey.dev/allow/<namespace> must carry (helm install ... --set clusterName=<name>; docs/design.md, rule 2)" .Values.clusterName }}
{{- end }}

{{/* The RBAC rules of deploy/cluster-wide/clusterrole.yaml and deploy/namespaced/role.yaml (the same list). */}}
{{- define "rekey.rules" -}}
# Watch the resources it reconciles (its cache also enforces one owner per IAM user); patch to
# add and remove its finalizer, and to request an emergency rotation from a leak report.
- apiGroups: ["rekey.dev"]
  resources: ["iamkeyrotations"]
  verbs: ["get", "list", "watch", "patch"]
# Report progress. The status is replaced whole (with a resourceVersion precondition).
- apiGroups: ["rekey.dev"]
  resources: ["iamkeyrotations/status"]
  verbs: ["update"]
# Only the Secrets a spec names, by name: get to read the key they hold, create for the staging
# Secret, patch (server-side apply) to write the keys rekey owns, delete for the staging Secret.
# No list or watch: rekey cannot enumerate the cluster's Secrets.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "patch", "delete"]
# Discover the workloads that read the Secrets (list), restart them onto the new key (patch), and
# wake in-flight rotations on their changes (watch: metadata only, while a rotation is in flight).
# The stamp reads the workload first (get) to keep the keys other rotations' pods still need.
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets", "daemonsets"]
  verbs: ["get", "list", "watch", "patch"]
# The consumer census: which workload controls each pod, for rollout completion and the pods no
# rolled workload covers. Read-only.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: ["apps"]
  resources: ["replicasets"]
  verbs: ["list", "watch"]
# Events for every phase change and failure.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
