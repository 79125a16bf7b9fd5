{{/* Base name of every object: <release>-cal-pose (or the release name when it already says cal-pose). */}}
{{- define "cal-pose.fullname" -}}
{{- if contains "cal-pose" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-cal-pose" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cal-pose.labels" -}}
app.kubernetes.io/name: cal-pose
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Tag of the cal-pose images. */}}
{{- define "cal-pose.tag" -}}
{{- .Values.images.tag | default .Chart.AppVersion -}}
{{- end -}}

{{/* A cal-pose image by name: <registry>/<name>:<tag>. */}}
{{- define "cal-pose.image" -}}
{{- printf "%s/%s:%s" (.root.Values.images.registry | trimSuffix "/") .name (include "cal-pose.tag" .root) -}}
{{- end -}}

{{- define "cal-pose.mlflowImage" -}}
{{- if .Values.mlflow.image.repository -}}
{{- printf "%s:%s" .Values.mlflow.image.repository (.Values.mlflow.image.tag | default (include "cal-pose.tag" .)) -}}
{{- else -}}
{{- include "cal-pose.image" (dict "root" . "name" "mlflow") -}}
{{- end -}}
{{- end -}}

{{/* Secret holding the S3 keys (created by the chart unless s3.existingSecret is set). */}}
{{- define "cal-pose.s3Secret" -}}
{{- .Values.s3.existingSecret | default .Values.pipelineEnv.s3SecretName -}}
{{- end -}}

{{- define "cal-pose.postgresSecret" -}}
{{- .Values.postgresql.existingSecret | default (printf "%s-postgresql" (include "cal-pose.fullname" .)) -}}
{{- end -}}

{{- define "cal-pose.usePostgres" -}}
{{- if and .Values.mlflow.enabled (not .Values.mlflow.externalDatabase.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* In-cluster URL of the MLflow server. */}}
{{- define "cal-pose.mlflowUrl" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s-mlflow.%s.svc:%v" (include "cal-pose.fullname" .) .Release.Namespace .Values.mlflow.port -}}
{{- else -}}
{{- required "mlflow.externalTrackingUri is required when mlflow.enabled=false" .Values.mlflow.externalTrackingUri -}}
{{- end -}}
{{- end -}}

{{- define "cal-pose.imagePullSecrets" -}}
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Environment of the MLflow containers: the database URI (no password in it: libpq reads PGPASSWORD,
     so any characters work), S3 for the artifacts. */}}
{{- define "cal-pose.mlflowEnv" -}}
{{- if .Values.mlflow.externalDatabase.existingSecret }}
- name: MLFLOW_BACKEND_STORE_URI
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mlflow.externalDatabase.existingSecret }}
      key: uri
{{- else }}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "cal-pose.postgresSecret" . }}
      key: password
- name: MLFLOW_BACKEND_STORE_URI
  value: "postgresql+psycopg2://{{ .Values.postgresql.username }}@{{ include "cal-pose.fullname" . }}-postgresql:5432/{{ .Values.postgresql.database }}"
{{- end }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ .Values.s3.endpoint | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "cal-pose.s3Secret" . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "cal-pose.s3Secret" . }}
      key: AWS_SECRET_ACCESS_KEY
{{- end -}}

{{/* Container hardening for Pod Security "restricted": no privilege escalation, no capabilities. */}}
{{- define "cal-pose.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  capabilities:
    drop: ["ALL"]
{{- end -}}
