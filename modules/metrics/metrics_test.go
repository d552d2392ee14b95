package metrics

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// Two handlers in one config register into the same registry; a reload
// registers into a fresh one. Neither may fail, and counts carry over.
func TestRegisterTwiceAndAcrossRegistries(t *testing.T) {
	first := prometheus.NewPedanticRegistry()
	if err := Register(first); err != nil {
		t.Fatalf("first registration: %v", err)
	}
	if err := Register(first); err != nil {
		t.Fatalf("second handler in the same config: %v", err)
	}
	before := testutil.ToFloat64(ConnectionsTotal)
	ConnectionsTotal.Inc()

	reloaded := prometheus.NewPedanticRegistry() // a config reload brings a new registry
	if err := Register(reloaded); err != nil {
		t.Fatalf("registration after reload: %v", err)
	}
	if got := testutil.ToFloat64(ConnectionsTotal); got != before+1 {
		t.Fatalf("connections_total = %v after reload, want %v", got, before+1)
	}
	n, err := testutil.GatherAndCount(reloaded,
		"whatsapp_proxy_connections_total", "whatsapp_proxy_connections_active",
		"whatsapp_proxy_bytes_sent_total", "whatsapp_proxy_bytes_received_total",
		"whatsapp_proxy_errors_total", "whatsapp_proxy_protocol_connections")
	if err != nil {
		t.Fatal(err)
	}
	// 4 plain series + one per error kind + one per protocol
	if want := 4 + len(ErrorKinds) + len(Protocols); n != want {
		t.Fatalf("reloaded registry exposes %d series, want %d", n, want)
	}
}

// A different collector under one of our names is a real conflict and must
// be reported, not swallowed.
func TestRegisterConflict(t *testing.T) {
	reg := prometheus.NewRegistry()
	impostor := prometheus.NewCounter(prometheus.CounterOpts{Name: "whatsapp_proxy_connections_total", Help: "x"})
	reg.MustRegister(impostor)
	if err := Register(reg); err == nil {
		t.Fatal("Register accepted a registry where another collector owns whatsapp_proxy_connections_total")
	}
}

func TestRegisterNil(t *testing.T) {
	if err := Register(nil); err != nil {
		t.Fatal(err)
	}
}
