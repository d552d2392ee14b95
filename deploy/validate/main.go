// Command validate checks the Kubernetes manifests in deploy/kubernetes
// offline, with no cluster and nothing fetched at run time:
//
//   - it builds the kustomization with kustomize's own library, as
//     `kubectl apply -k` does;
//   - it decodes every object, built or standalone (servicemonitor.yaml,
//     hpa.yaml, service-local.yaml), strictly into the Kubernetes API types:
//     an unknown or misspelled field, a wrong type or a duplicate key is an
//     error;
//   - it evaluates every pod template against the Pod Security "restricted"
//     profile with the upstream policy code (k8s.io/pod-security-admission);
//   - it cross-checks the objects: selectors, port and volume references, the
//     ConfigMap the pods mount, writable data and config directories for Caddy
//     on the read-only root filesystem, PROXY-protocol load balancers aimed only
//     at the PROXY-reading ports (named "*-pp"), and the Dockerfile's EXPOSE
//     list against the container's ports.
//
// Usage, from this directory (its own Go module, so the main module does not
// depend on k8s.io):
//
//	go run . [-dockerfile ../../Dockerfile] ../kubernetes
//
// With -print it prints the built kustomization instead (`kubectl kustomize`).
package main

import (
	"flag"
	"fmt"
	"os"
)

func main() {
	printOnly := flag.Bool("print", false, "only print the built kustomization, like `kubectl kustomize`")
	dockerfile := flag.String("dockerfile", "../../Dockerfile", "the Dockerfile whose EXPOSE list must match the container ports (empty: skip)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: go run . [-dockerfile path] <kustomization dir>\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	if *printOnly {
		resMap, err := build(flag.Arg(0))
		if err == nil {
			var out []byte
			if out, err = resMap.AsYaml(); err == nil {
				_, err = os.Stdout.Write(out)
			}
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "validate:", err)
			os.Exit(1)
		}
		return
	}
	report, err := Validate(flag.Arg(0), *dockerfile)
	if err != nil {
		fmt.Fprintf(os.Stderr, "validate: %s: invalid:\n%v\n", flag.Arg(0), err)
		os.Exit(1)
	}
	fmt.Println(report)
}
