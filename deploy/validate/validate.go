package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	metavalidation "k8s.io/apimachinery/pkg/apis/meta/v1/validation"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	psaapi "k8s.io/pod-security-admission/api"
	psapolicy "k8s.io/pod-security-admission/policy"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/resmap"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// object is one decoded manifest object and where it came from.
type object struct {
	source string // "kustomization" or a file name
	meta   metav1.ObjectMeta
	kind   string
	value  any // a pointer to the typed object
}

func (o object) String() string { return fmt.Sprintf("%s %s (%s)", o.kind, o.meta.Name, o.source) }

// newObject returns an empty typed object for apiVersion and kind.
func newObject(apiVersion, kind string) (any, error) {
	switch apiVersion + " " + kind {
	case "v1 Namespace":
		return &corev1.Namespace{}, nil
	case "v1 ConfigMap":
		return &corev1.ConfigMap{}, nil
	case "v1 Service":
		return &corev1.Service{}, nil
	case "apps/v1 Deployment":
		return &appsv1.Deployment{}, nil
	case "policy/v1 PodDisruptionBudget":
		return &policyv1.PodDisruptionBudget{}, nil
	case "autoscaling/v2 HorizontalPodAutoscaler":
		return &autoscalingv2.HorizontalPodAutoscaler{}, nil
	case "monitoring.coreos.com/v1 ServiceMonitor":
		return &monitoringv1.ServiceMonitor{}, nil
	}
	return nil, fmt.Errorf("unknown apiVersion/kind %q %q (the validator knows Namespace, ConfigMap, Service, Deployment, PodDisruptionBudget, HorizontalPodAutoscaler, ServiceMonitor)", apiVersion, kind)
}

// decode decodes one YAML or JSON document strictly: unknown fields, wrong
// types and duplicate keys are errors.
func decode(source string, doc []byte) (object, error) {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return object{}, fmt.Errorf("%s: %w", source, err)
	}
	v, err := newObject(tm.APIVersion, tm.Kind)
	if err != nil {
		return object{}, fmt.Errorf("%s: %w", source, err)
	}
	if err := yaml.UnmarshalStrict(doc, v); err != nil {
		return object{}, fmt.Errorf("%s: %s: %w", source, tm.Kind, err)
	}
	accessor, ok := v.(metav1.ObjectMetaAccessor)
	if !ok {
		return object{}, fmt.Errorf("%s: %s has no metadata", source, tm.Kind)
	}
	return object{source: source, meta: *accessor.GetObjectMeta().(*metav1.ObjectMeta), kind: tm.Kind, value: v}, nil
}

// Validate checks the kustomization in dir and the standalone manifests
// beside it, and returns a one-line summary.
func Validate(dir, dockerfile string) (string, error) {
	kz, err := readKustomization(dir)
	if err != nil {
		return "", err
	}
	var objs []object
	var errs []error

	resMap, err := build(dir)
	if err != nil {
		return "", err
	}
	built := 0
	for _, r := range resMap.Resources() {
		data, err := r.AsYAML()
		if err != nil {
			return "", fmt.Errorf("kustomize build %s: %s: %w", dir, r.CurId(), err)
		}
		o, err := decode("kustomization", data)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		objs = append(objs, o)
		built++
	}

	// Every other manifest in the directory, decoded on its own.
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return "", err
	}
	standalone := 0
	for _, f := range files {
		base := filepath.Base(f)
		if base == "kustomization.yaml" || slices.Contains(kz.Resources, base) {
			continue
		}
		docs, err := readDocs(f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, doc := range docs {
			o, err := decode(base, doc)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if o.meta.Namespace != kz.Namespace {
				errs = append(errs, fmt.Errorf("%s: namespace %q, want the kustomization's %q (it is applied on its own)", o, o.meta.Namespace, kz.Namespace))
			}
			objs = append(objs, o)
			standalone++
		}
	}

	if len(errs) > 0 {
		// Cross-checks on a partial set would only repeat the cause.
		return "", errors.Join(errs...)
	}
	var exposed []int32
	if dockerfile != "" {
		exposed, err = readExpose(dockerfile)
		if err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, check(objs, kz.Namespace, exposed)...)
	if len(errs) > 0 {
		return "", errors.Join(errs...)
	}
	kinds := map[string]int{}
	for _, o := range objs {
		kinds[o.kind]++
	}
	var list []string
	for k, n := range kinds {
		list = append(list, fmt.Sprintf("%d %s", n, k))
	}
	sort.Strings(list)
	return fmt.Sprintf("ok: %d objects from the kustomization, %d standalone (%s); strict decoding, Pod Security restricted, references checked",
		built, standalone, strings.Join(list, ", ")), nil
}

// build builds the kustomization in dir as `kubectl apply -k` does.
func build(dir string) (resmap.ResMap, error) {
	opts := krusty.MakeDefaultOptions()
	opts.Reorder = krusty.ReorderOptionLegacy // kubectl's order: Namespace first, ConfigMaps before Deployments
	resMap, err := krusty.MakeKustomizer(opts).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", dir, err)
	}
	return resMap, nil
}

func readKustomization(dir string) (*types.Kustomization, error) {
	data, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		return nil, err
	}
	var kz types.Kustomization
	if err := yaml.UnmarshalStrict(data, &kz); err != nil {
		return nil, fmt.Errorf("kustomization.yaml: %w", err)
	}
	if kz.Namespace == "" {
		return nil, errors.New("kustomization.yaml: no namespace")
	}
	return &kz, nil
}

func readDocs(path string) ([][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := utilyaml.NewYAMLReader(bufio.NewReader(f))
	var docs [][]byte
	for {
		doc, err := r.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if len(bytes.TrimSpace(stripComments(doc))) > 0 {
			docs = append(docs, doc)
		}
	}
	if len(docs) == 0 {
		return nil, fmt.Errorf("%s: no manifest", path)
	}
	return docs, nil
}

func stripComments(doc []byte) []byte {
	var out []byte
	for line := range bytes.Lines(doc) {
		if !bytes.HasPrefix(bytes.TrimSpace(line), []byte("#")) {
			out = append(out, line...)
		}
	}
	return out
}

// readExpose returns the ports of the Dockerfile's EXPOSE instructions.
func readExpose(path string) ([]int32, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var ports []int32
	for line := range strings.Lines(string(data)) {
		fields := strings.Fields(line)
		if len(fields) == 0 || !strings.EqualFold(fields[0], "EXPOSE") {
			continue
		}
		for _, f := range fields[1:] {
			p, err := strconv.ParseUint(strings.TrimSuffix(f, "/tcp"), 10, 16)
			if err != nil {
				return nil, fmt.Errorf("%s: EXPOSE %q: not a TCP port", path, f)
			}
			ports = append(ports, int32(p))
		}
	}
	if len(ports) == 0 {
		return nil, fmt.Errorf("%s: no EXPOSE", path)
	}
	return ports, nil
}

// proxyProtocolAnnotations are the Service annotations that make a cloud
// load balancer send a PROXY header, with the values that turn it off.
var proxyProtocolAnnotations = map[string][]string{
	"service.beta.kubernetes.io/aws-load-balancer-proxy-protocol":                    {""},
	"service.beta.kubernetes.io/do-loadbalancer-enable-proxy-protocol":               {"", "false"},
	"load-balancer.hetzner.cloud/uses-proxyprotocol":                                 {"", "false"},
	"service.beta.kubernetes.io/linode-loadbalancer-default-proxy-protocol":          {"", "none"},
	"service.beta.kubernetes.io/scw-loadbalancer-proxy-protocol-v2":                  {""},
	"service.beta.kubernetes.io/scw-loadbalancer-proxy-protocol-v1":                  {""},
	"service.beta.kubernetes.io/ovh-loadbalancer-proxy-protocol":                     {"", "none"},
	"service.beta.kubernetes.io/vultr-loadbalancer-proxy-protocol":                   {"", "false"},
	"service.beta.kubernetes.io/oci-load-balancer-connection-proxy-protocol-version": {""},
}

func sendsProxyProtocol(svc *corev1.Service) bool {
	for k, off := range proxyProtocolAnnotations {
		if v, ok := svc.Annotations[k]; ok && !slices.Contains(off, v) {
			return true
		}
	}
	return false
}

// proxyPortSuffix marks the container ports that expect a PROXY header.
const proxyPortSuffix = "-pp"

// writableDirs are the environment variables naming Caddy's writable directories.
var writableDirs = []string{"XDG_DATA_HOME", "XDG_CONFIG_HOME"}

func check(objs []object, namespace string, exposed []int32) []error {
	var errs []error
	fail := func(o object, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", o, fmt.Sprintf(format, args...)))
	}
	evaluator, err := psapolicy.NewEvaluator(psapolicy.DefaultChecks(), nil)
	if err != nil {
		return []error{err}
	}

	configMaps := map[string]*corev1.ConfigMap{}
	var deployments []*appsv1.Deployment
	var services []*corev1.Service
	for _, o := range objs {
		if errList := metavalidation.ValidateLabels(o.meta.Labels, field.NewPath("metadata", "labels")); len(errList) > 0 {
			fail(o, "%v", errList.ToAggregate())
		}
		if msgs := validation.IsDNS1123Subdomain(o.meta.Name); len(msgs) > 0 {
			fail(o, "name: %s", strings.Join(msgs, "; "))
		}
		if o.kind != "Namespace" && o.meta.Namespace != namespace {
			fail(o, "namespace %q, want %q", o.meta.Namespace, namespace)
		}
		switch v := o.value.(type) {
		case *corev1.ConfigMap:
			configMaps[v.Name] = v
		case *appsv1.Deployment:
			deployments = append(deployments, v)
		case *corev1.Service:
			services = append(services, v)
		}
	}
	if len(deployments) == 0 {
		errs = append(errs, errors.New("no Deployment"))
	}

	for _, o := range objs {
		switch v := o.value.(type) {
		case *appsv1.Deployment:
			errs = append(errs, checkDeployment(o, v, evaluator, configMaps, exposed)...)
		case *corev1.Service:
			errs = append(errs, checkService(o, v, deployments)...)
		case *policyv1.PodDisruptionBudget:
			d := selected(v.Spec.Selector, deployments)
			if d == nil {
				fail(o, "selects no Deployment's pods")
				break
			}
			if v.Spec.MinAvailable == nil && v.Spec.MaxUnavailable == nil {
				fail(o, "neither minAvailable nor maxUnavailable")
			}
			if m := v.Spec.MinAvailable; m != nil && m.Type == intstr.Int && d.Spec.Replicas != nil && m.IntVal >= *d.Spec.Replicas {
				fail(o, "minAvailable %d with %d replicas blocks every drain", m.IntVal, *d.Spec.Replicas)
			}
			if m := v.Spec.MaxUnavailable; m != nil && m.Type == intstr.Int && m.IntVal < 1 {
				fail(o, "maxUnavailable %d blocks every drain", m.IntVal)
			}
		case *autoscalingv2.HorizontalPodAutoscaler:
			ref := v.Spec.ScaleTargetRef
			var d *appsv1.Deployment
			for _, cand := range deployments {
				if ref.Kind == "Deployment" && ref.APIVersion == "apps/v1" && ref.Name == cand.Name {
					d = cand
				}
			}
			if d == nil {
				fail(o, "scaleTargetRef %s %s %s is not a Deployment here", ref.APIVersion, ref.Kind, ref.Name)
				break
			}
			if v.Spec.MinReplicas == nil || *v.Spec.MinReplicas < 1 || *v.Spec.MinReplicas > v.Spec.MaxReplicas {
				fail(o, "minReplicas must be between 1 and maxReplicas (%d)", v.Spec.MaxReplicas)
			}
			for _, m := range v.Spec.Metrics {
				if m.Resource == nil {
					continue
				}
				for _, c := range d.Spec.Template.Spec.Containers {
					if _, ok := c.Resources.Requests[m.Resource.Name]; !ok {
						fail(o, "scales on %s utilization but container %s requests no %s", m.Resource.Name, c.Name, m.Resource.Name)
					}
				}
			}
		case *monitoringv1.ServiceMonitor:
			sel, err := metav1.LabelSelectorAsSelector(&v.Spec.Selector)
			if err != nil || sel.Empty() {
				fail(o, "selector: empty or invalid (%v)", err)
				break
			}
			var svc *corev1.Service
			for _, s := range services {
				if sel.Matches(labels.Set(s.Labels)) {
					svc = s
				}
			}
			if svc == nil {
				fail(o, "selects no Service")
				break
			}
			if len(v.Spec.Endpoints) == 0 {
				fail(o, "no endpoints")
			}
			for _, ep := range v.Spec.Endpoints {
				if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == ep.Port }) {
					fail(o, "endpoint port %q is not a port name of Service %s", ep.Port, svc.Name)
				}
			}
		}
	}
	return errs
}

// selected returns the Deployment whose pods sel selects.
func selected(sel *metav1.LabelSelector, deployments []*appsv1.Deployment) *appsv1.Deployment {
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil || s.Empty() {
		return nil
	}
	for _, d := range deployments {
		if s.Matches(labels.Set(d.Spec.Template.Labels)) {
			return d
		}
	}
	return nil
}

func checkDeployment(o object, d *appsv1.Deployment, evaluator psapolicy.Evaluator, configMaps map[string]*corev1.ConfigMap, exposed []int32) []error {
	var errs []error
	fail := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", o, fmt.Sprintf(format, args...)))
	}
	pod := d.Spec.Template.Spec
	if selected(d.Spec.Selector, []*appsv1.Deployment{d}) == nil {
		fail("spec.selector does not select the pod template's labels")
	}
	for _, r := range evaluator.EvaluatePod(psaapi.LevelVersion{Level: psaapi.LevelRestricted, Version: psaapi.LatestVersion()}, &d.Spec.Template.ObjectMeta, &pod) {
		if !r.Allowed {
			fail("Pod Security restricted: %s: %s", r.ForbiddenReason, r.ForbiddenDetail)
		}
	}

	volumes := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		if _, dup := volumes[v.Name]; dup {
			fail("volume %s declared twice", v.Name)
		}
		volumes[v.Name] = v
		if cm := v.ConfigMap; cm != nil {
			m, ok := configMaps[cm.Name]
			if !ok {
				fail("volume %s: ConfigMap %s is not in the manifests", v.Name, cm.Name)
				continue
			}
			for _, item := range cm.Items {
				if _, ok := m.Data[item.Key]; !ok {
					fail("volume %s: ConfigMap %s has no key %q", v.Name, cm.Name, item.Key)
				}
			}
		}
	}
	if len(pod.Containers) == 0 {
		fail("no containers")
	}
	for _, c := range pod.Containers {
		cfail := func(format string, args ...any) { fail("container %s: %s", c.Name, fmt.Sprintf(format, args...)) }
		sc := c.SecurityContext
		if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			cfail("securityContext.readOnlyRootFilesystem must be true")
		}
		if sc != nil && sc.Capabilities != nil {
			for _, add := range sc.Capabilities.Add {
				if add != "NET_BIND_SERVICE" {
					cfail("adds capability %s (only NET_BIND_SERVICE is acceptable)", add)
				}
			}
		}
		for _, res := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
			if _, ok := c.Resources.Requests[res]; !ok {
				cfail("no %s request", res)
			}
		}
		if _, ok := c.Resources.Limits[corev1.ResourceMemory]; !ok {
			cfail("no memory limit")
		}

		names := map[string]corev1.ContainerPort{}
		numbers := map[int32]corev1.ContainerPort{}
		for _, p := range c.Ports {
			if p.Name == "" {
				cfail("port %d has no name", p.ContainerPort)
			} else if msgs := validation.IsValidPortName(p.Name); len(msgs) > 0 {
				cfail("port name %q: %s", p.Name, strings.Join(msgs, "; "))
			}
			if _, dup := names[p.Name]; dup && p.Name != "" {
				cfail("port name %q used twice", p.Name)
			}
			if _, dup := numbers[p.ContainerPort]; dup {
				cfail("port %d listed twice", p.ContainerPort)
			}
			if p.HostPort != 0 {
				cfail("port %s uses a hostPort", p.Name)
			}
			names[p.Name] = p
			numbers[p.ContainerPort] = p
		}
		if exposed != nil {
			var declared []int32
			for n := range numbers {
				declared = append(declared, n)
			}
			slices.Sort(declared)
			want := slices.Sorted(slices.Values(exposed))
			if !slices.Equal(declared, want) {
				cfail("container ports %v differ from the Dockerfile's EXPOSE %v", declared, want)
			}
		}

		for name, probe := range map[string]*corev1.Probe{"readinessProbe": c.ReadinessProbe, "livenessProbe": c.LivenessProbe} {
			if probe == nil {
				cfail("no %s", name)
				continue
			}
			var port *intstr.IntOrString
			switch {
			case probe.HTTPGet != nil:
				port = &probe.HTTPGet.Port
			case probe.TCPSocket != nil:
				port = &probe.TCPSocket.Port
			default:
				cfail("%s: neither httpGet nor tcpSocket", name)
				continue
			}
			if !portDeclared(*port, names, numbers) {
				cfail("%s: port %s is not a declared container port", name, port.String())
			}
		}

		mounts := map[string]corev1.VolumeMount{}
		for _, m := range c.VolumeMounts {
			if _, ok := volumes[m.Name]; !ok {
				cfail("volumeMount %s: no such volume", m.Name)
			}
			if _, dup := mounts[m.MountPath]; dup {
				cfail("two volumes mounted at %s", m.MountPath)
			}
			mounts[m.MountPath] = m
		}
		// Caddy writes certificates and its local CA to XDG_DATA_HOME and
		// its autosave to XDG_CONFIG_HOME; the root filesystem is read-only.
		for _, env := range writableDirs {
			i := slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == env })
			if i < 0 {
				cfail("env %s is not set (Caddy would write under $HOME on the read-only root filesystem)", env)
				continue
			}
			m, ok := mounts[c.Env[i].Value]
			if !ok || m.ReadOnly || volumes[m.Name].EmptyDir == nil && volumes[m.Name].PersistentVolumeClaim == nil {
				cfail("%s=%s is not a writable emptyDir or PVC mount", env, c.Env[i].Value)
			}
		}
	}
	return errs
}

func portDeclared(p intstr.IntOrString, names map[string]corev1.ContainerPort, numbers map[int32]corev1.ContainerPort) bool {
	if p.Type == intstr.String {
		_, ok := names[p.StrVal]
		return ok
	}
	_, ok := numbers[p.IntVal]
	return ok
}

func checkService(o object, svc *corev1.Service, deployments []*appsv1.Deployment) []error {
	var errs []error
	fail := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", o, fmt.Sprintf(format, args...)))
	}
	d := selected(&metav1.LabelSelector{MatchLabels: svc.Spec.Selector}, deployments)
	if d == nil {
		fail("selector %v selects no Deployment's pods", svc.Spec.Selector)
		return errs
	}
	byName := map[string]corev1.ContainerPort{}
	byNumber := map[int32]corev1.ContainerPort{}
	for _, c := range d.Spec.Template.Spec.Containers {
		for _, p := range c.Ports {
			byName[p.Name] = p
			byNumber[p.ContainerPort] = p
		}
	}
	proxyProtocol := sendsProxyProtocol(svc)
	if len(svc.Spec.Ports) == 0 {
		fail("no ports")
	}
	seenName := map[string]bool{}
	seenPort := map[int32]bool{}
	for _, p := range svc.Spec.Ports {
		if msgs := validation.IsValidPortName(p.Name); len(msgs) > 0 {
			fail("port name %q: %s", p.Name, strings.Join(msgs, "; "))
		}
		if seenName[p.Name] || seenPort[p.Port] {
			fail("port %s/%d listed twice", p.Name, p.Port)
		}
		seenName[p.Name], seenPort[p.Port] = true, true
		target := p.TargetPort
		if target.Type == intstr.Int && target.IntVal == 0 {
			target = intstr.FromInt32(p.Port)
		}
		var cp corev1.ContainerPort
		var ok bool
		if target.Type == intstr.String {
			cp, ok = byName[target.StrVal]
		} else {
			cp, ok = byNumber[target.IntVal]
		}
		if !ok {
			fail("port %s: targetPort %s is not a container port of Deployment %s", p.Name, target.String(), d.Name)
			continue
		}
		if cp.Protocol != p.Protocol {
			fail("port %s: protocol %s, the container port's is %s", p.Name, p.Protocol, cp.Protocol)
		}
		pp := strings.HasSuffix(cp.Name, proxyPortSuffix)
		switch {
		case proxyProtocol && !pp:
			fail("port %s: the load balancer sends PROXY headers, but targetPort %s (%s) does not read them: use a %q port", p.Name, target.String(), cp.Name, "*"+proxyPortSuffix)
		case !proxyProtocol && pp:
			fail("port %s: targetPort %s (%s) requires a PROXY header, but no annotation turns PROXY protocol on", p.Name, target.String(), cp.Name)
		}
		if cp.Name == "metrics" && svc.Spec.Type != corev1.ServiceTypeClusterIP && svc.Spec.Type != "" {
			fail("port %s: the metrics port in a %s Service would publish it", p.Name, svc.Spec.Type)
		}
	}
	if svc.Spec.ExternalTrafficPolicy != "" && svc.Spec.Type != corev1.ServiceTypeLoadBalancer && svc.Spec.Type != corev1.ServiceTypeNodePort {
		fail("externalTrafficPolicy on a %s Service", svc.Spec.Type)
	}
	return errs
}
