package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The shipped manifests and Dockerfile pass.
func TestShippedManifests(t *testing.T) {
	report, err := Validate("../kubernetes", "../../Dockerfile")
	if err != nil {
		t.Fatalf("deploy/kubernetes does not validate:\n%v", err)
	}
	for _, want := range []string{"1 Deployment", "3 Service", "1 ServiceMonitor", "1 HorizontalPodAutoscaler", "1 PodDisruptionBudget", "1 ConfigMap"} {
		if !strings.Contains(report, want) {
			t.Errorf("report %q does not count %q", report, want)
		}
	}
}

// The Service without PROXY protocol, swapped in as the kustomization's
// comment says, validates too.
func TestServiceLocalSwappedIn(t *testing.T) {
	dir := copyManifests(t)
	path := filepath.Join(dir, "kustomization.yaml")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	swapped := strings.Replace(string(data), "  - service.yaml\n", "  - service-local.yaml\n", 1)
	if swapped == string(data) {
		t.Fatal("kustomization.yaml does not list service.yaml")
	}
	if err := os.WriteFile(path, []byte(swapped), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Validate(dir, filepath.Join(dir, "Dockerfile")); err != nil {
		t.Fatalf("with service-local.yaml: %v", err)
	}
}

// Each defect, made in a copy of the shipped files, is reported with a
// message that names it.
func TestDefects(t *testing.T) {
	for _, tc := range []struct {
		name, file, old, new, want string
	}{
		{"misspelled field", "deployment.yaml", "readinessProbe:", "readinesProbe:", `Deployment: error unmarshaling JSON: while decoding JSON: json: unknown field "readinesProbe"`},
		{"wrong type", "pdb.yaml", "maxUnavailable: 1", "maxUnavailable: [1]", "PodDisruptionBudget"},
		{"unknown kind", "hpa.yaml", "kind: HorizontalPodAutoscaler", "kind: HorizontalPodScaler", "unknown apiVersion/kind"},
		{"privilege escalation", "deployment.yaml", "allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true", "Pod Security restricted: allowPrivilegeEscalation != false"},
		{"extra capability", "deployment.yaml", `drop: ["ALL"]`, "drop: [\"ALL\"]\n              add: [\"NET_ADMIN\"]", "adds capability NET_ADMIN"},
		{"unsafe sysctl", "deployment.yaml", "net.ipv4.ip_unprivileged_port_start", "net.core.somaxconn", "Pod Security restricted: forbidden sysctls"},
		{"writable root", "deployment.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "readOnlyRootFilesystem must be true"},
		{"data dir not writable", "deployment.yaml", "mountPath: /data", "mountPath: /srv/data", "XDG_DATA_HOME=/data is not a writable emptyDir"},
		{"probe port", "deployment.yaml", "port: metrics\n            periodSeconds: 5", "port: metric\n            periodSeconds: 5", "readinessProbe: port metric is not a declared container port"},
		{"configmap key", "deployment.yaml", "- key: Caddyfile", "- key: caddyfile", `has no key "caddyfile"`},
		{"selector", "service-metrics.yaml", "instance: waproxy\n  ports", "instance: other\n  ports", "selects no Deployment's pods"},
		{"target port", "service.yaml", "targetPort: chat-pp", "targetPort: chat-px", "targetPort chat-px is not a container port"},
		{"PROXY to a plain port", "service.yaml", "port: 443, targetPort: https-pp", "port: 443, targetPort: https", "does not read them"},
		{"plain to a PROXY port", "service-local.yaml", "targetPort: chat,", "targetPort: chat-pp,", "requires a PROXY header"},
		{"metrics published", "service-metrics.yaml", "type: ClusterIP", "type: LoadBalancer", "would publish it"},
		{"service monitor port", "servicemonitor.yaml", "- port: metrics", "- port: metricz", `endpoint port "metricz"`},
		{"standalone namespace", "hpa.yaml", "namespace: waproxy", "namespace: default", `namespace "default", want the kustomization's "waproxy"`},
		{"hpa target", "hpa.yaml", "name: waproxy\n  minReplicas", "name: proxy\n  minReplicas", "is not a Deployment here"},
		{"expose", "Dockerfile", "8222 8199", "8222", "differ from the Dockerfile's EXPOSE"},
		{"kustomize", "kustomization.yaml", "- pdb.yaml", "- missing.yaml", "kustomize build"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := copyManifests(t)
			path := filepath.Join(dir, tc.file)
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(data), tc.old) {
				t.Fatalf("%s has no %q to change", tc.file, tc.old)
			}
			if err := os.WriteFile(path, []byte(strings.Replace(string(data), tc.old, tc.new, 1)), 0o644); err != nil {
				t.Fatal(err)
			}
			_, err = Validate(dir, filepath.Join(dir, "Dockerfile"))
			if err == nil {
				t.Fatalf("%s with %q → %q validates", tc.file, tc.old, tc.new)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error does not mention %q:\n%v", tc.want, err)
			}
		})
	}
}

// copyManifests copies deploy/kubernetes and the Dockerfile into a temporary
// directory.
func copyManifests(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	entries, err := os.ReadDir("../kubernetes")
	if err != nil {
		t.Fatal(err)
	}
	copyFile := func(from, to string) {
		data, err := os.ReadFile(from)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(to, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, e := range entries {
		if !e.IsDir() {
			copyFile(filepath.Join("../kubernetes", e.Name()), filepath.Join(dir, e.Name()))
		}
	}
	copyFile("../../Dockerfile", filepath.Join(dir, "Dockerfile"))
	return dir
}
