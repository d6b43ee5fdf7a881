{{/*
OpenAPI v3 schema shared by CiliumEnvoyConfig and CiliumClusterwideEnvoyConfig.

It must stay structurally identical to the schema Cilium ships for
cilium.io/v2 (both kinds use the same Go type, CiliumEnvoyConfigSpec), so that
objects valid for one are valid for the other and the Cilium operator, when
present, sees nothing to reconcile but its own version label.
tests/crd_schema_matches_cilium.py compares the two.

Keys are grouped by meaning here (type first, then the fields in the order a
reader meets them); the API server does not care about key order.
*/}}
{{- define "sluice.crd.cecSchema" -}}
type: object
required:
  - metadata
properties:
  apiVersion:
    type: string
    description: |-
      APIVersion defines the versioned schema of this representation of an object.
      Servers should convert recognized schemas to the latest internal value, and
      may reject unrecognized values.
      More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources
  kind:
    type: string
    description: |-
      Kind is a string value representing the REST resource this object represents.
      Servers may infer this from the endpoint the client submits requests to.
      Cannot be updated.
      In CamelCase.
      More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds
  metadata:
    type: object
  spec:
    type: object
    required:
      - resources
    properties:
      resources:
        type: array
        description: |-
          Envoy xDS resources, a list of the following Envoy resource types:
          type.googleapis.com/envoy.config.listener.v3.Listener,
          type.googleapis.com/envoy.config.route.v3.RouteConfiguration,
          type.googleapis.com/envoy.config.cluster.v3.Cluster,
          type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment, and
          type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret.
        items:
          # Any Envoy resource: decoded by the proxy, not by the API server.
          type: object
          x-kubernetes-preserve-unknown-fields: true
      services:
        type: array
        description: |-
          Services specifies Kubernetes services for which traffic is
          forwarded to an Envoy listener for L7 load balancing. Backends
          of these services are automatically synced to Envoy usign EDS.
        items:
          type: object
          required:
            - name
          properties:
            name:
              type: string
              description: |-
                Name is the name of a destination Kubernetes service that identifies traffic
                to be redirected.
            namespace:
              type: string
              description: |-
                Namespace is the Kubernetes service namespace.
                In CiliumEnvoyConfig namespace this is overridden to the namespace of the CEC,
                In CiliumClusterwideEnvoyConfig namespace defaults to "default".
            listener:
              type: string
              description: |-
                Listener specifies the name of the Envoy listener the
                service traffic is redirected to. The listener must be
                specified in the Envoy 'resources' of the same
                CiliumEnvoyConfig.

                If omitted, the first listener specified in 'resources' is
                used.
            ports:
              type: array
              description: |-
                Ports is a set of service's frontend ports that should be redirected to the Envoy
                listener. By default all frontend ports of the service are redirected.
              items:
                type: integer
      backendServices:
        type: array
        description: |-
          BackendServices specifies Kubernetes services whose backends
          are automatically synced to Envoy using EDS.  Traffic for these
          services is not forwarded to an Envoy listener. This allows an
          Envoy listener load balance traffic to these backends while
          normal Cilium service load balancing takes care of balancing
          traffic for these services at the same time.
        items:
          type: object
          required:
            - name
          properties:
            name:
              type: string
              description: |-
                Name is the name of a destination Kubernetes service that identifies traffic
                to be redirected.
            namespace:
              type: string
              description: |-
                Namespace is the Kubernetes service namespace.
                In CiliumEnvoyConfig namespace defaults to the namespace of the CEC,
                In CiliumClusterwideEnvoyConfig namespace defaults to "default".
            number:
              type: array
              description: |-
                Ports is a set of port numbers, which can be used for filtering in case of underlying
                is exposing multiple port numbers.
              items:
                type: string
      nodeSelector:
        type: object
        x-kubernetes-map-type: atomic
        description: |-
          NodeSelector is a label selector that determines to which nodes
          this configuration applies.
          If nil, then this config applies to all nodes.
        properties:
          matchLabels:
            type: object
            description: |-
              matchLabels is a map of {key,value} pairs. A single {key,value} in the matchLabels
              map is equivalent to an element of matchExpressions, whose key field is "key", the
              operator is "In", and the values array contains only "value". The requirements are ANDed.
            additionalProperties:
              type: string
              description: "MatchLabelsValue represents the value from the MatchLabels {key,value} pair."
              maxLength: 63
              pattern: "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
          matchExpressions:
            type: array
            x-kubernetes-list-type: atomic
            description: "matchExpressions is a list of label selector requirements. The requirements are ANDed."
            items:
              type: object
              description: |-
                A label selector requirement is a selector that contains values, a key, and an operator that
                relates the key and values.
              required:
                - key
                - operator
              properties:
                key:
                  type: string
                  description: "key is the label key that the selector applies to."
                operator:
                  type: string
                  description: |-
                    operator represents a key's relationship to a set of values.
                    Valid operators are In, NotIn, Exists and DoesNotExist.
                  enum: ["In", "NotIn", "Exists", "DoesNotExist"]
                values:
                  type: array
                  x-kubernetes-list-type: atomic
                  description: |-
                    values is an array of string values. If the operator is In or NotIn,
                    the values array must be non-empty. If the operator is Exists or DoesNotExist,
                    the values array must be empty. This array is replaced during a strategic
                    merge patch.
                  items:
                    type: string
{{- end }}

{{/*
A CiliumEnvoyConfig-family CRD. Arguments (dict): root, kind, plural,
singular, shortName, scope.

Served and stored as cilium.io/v2 only, as Cilium does (v2alpha1 is no
longer part of Cilium's CRDs). The Cilium operator, if installed later,
finds no io.cilium.k8s.crd.schema.version label and upgrades the CRD in
place, taking it over.
*/}}
{{- define "sluice.crd" -}}
{{- $root := .root }}
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {{ printf "%s.cilium.io" .plural }}
  labels:
    {{- include "sluice.labels" $root | nindent 4 }}
  {{- if $root.Values.crds.keep }}
  annotations:
    # Deleting the CRD would delete every CEC/CCEC in the cluster.
    helm.sh/resource-policy: keep
  {{- end }}
spec:
  group: cilium.io
  scope: {{ .scope }}
  names:
    kind: {{ .kind }}
    listKind: {{ printf "%sList" .kind }}
    plural: {{ .plural }}
    singular: {{ .singular }}
    shortNames:
      - {{ .shortName }}
    categories:
      - cilium
  versions:
    - name: v2
      served: true
      storage: true
      subresources: {}
      additionalPrinterColumns:
        - name: Age
          type: date
          jsonPath: .metadata.creationTimestamp
          description: The age of the identity
      schema:
        openAPIV3Schema:
          {{- include "sluice.crd.cecSchema" $root | nindent 10 }}
{{- end }}
