package registry

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

func find(id uint64) (Info, bool) {
	for _, i := range List() {
		if i.ID == id {
			return i, true
		}
	}
	return Info{}, false
}

func TestOpenListClose(t *testing.T) {
	before := Len()
	c := Open(&Conn{Remote: "127.0.0.1:5000", Listener: "127.0.0.1:443", Protocol: "chat",
		Handler: "layer4.handlers.wa_proxy", Dialer: "wa.dialers.direct"})
	if c.ID() == 0 {
		t.Fatal("Open did not assign an id")
	}
	c.SetDestination("g.whatsapp.net:5222")
	c.FromClient.Add(10)
	c.FromUpstream.Add(20)
	info, ok := find(c.ID())
	if !ok {
		t.Fatalf("connection %d not listed", c.ID())
	}
	want := Info{ID: c.ID(), Remote: "127.0.0.1:5000", Listener: "127.0.0.1:443", Protocol: "chat",
		Handler: "layer4.handlers.wa_proxy", Destination: "g.whatsapp.net:5222", Dialer: "wa.dialers.direct",
		BytesFromClient: 10, BytesToClient: 20, Start: info.Start, DurationSeconds: info.DurationSeconds}
	if info != want {
		t.Fatalf("listed %+v, want %+v", info, want)
	}
	if info.Start.IsZero() || time.Since(info.Start) > time.Minute {
		t.Fatalf("start time %v is not now", info.Start)
	}
	if Len() != before+1 {
		t.Fatalf("Len %d, want %d", Len(), before+1)
	}
	Close(c, nil)
	Close(c, nil) // a second close is harmless
	if _, ok := find(c.ID()); ok {
		t.Fatal("closed connection still listed")
	}
	if Len() != before {
		t.Fatalf("Len %d after close, want %d", Len(), before)
	}
}

func TestListOrderAndUniqueIDs(t *testing.T) {
	var wg sync.WaitGroup
	conns := make([]*Conn, 100)
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conns[i] = Open(&Conn{Protocol: "tls"})
			conns[i].FromClient.Add(1)
		}()
	}
	wg.Wait()
	seen := make(map[uint64]bool)
	for _, c := range conns {
		if seen[c.ID()] {
			t.Fatalf("duplicate id %d", c.ID())
		}
		seen[c.ID()] = true
	}
	list := List()
	for i := 1; i < len(list); i++ {
		if list[i-1].ID >= list[i].ID {
			t.Fatalf("list not ordered by id: %d then %d", list[i-1].ID, list[i].ID)
		}
	}
	for _, c := range conns {
		Close(c, nil)
	}
	for _, c := range conns {
		if _, ok := find(c.ID()); ok {
			t.Fatalf("connection %d still listed", c.ID())
		}
	}
}

func next(t *testing.T, s *Subscriber) Event {
	t.Helper()
	select {
	case ev := <-s.Events():
		return ev
	case <-time.After(5 * time.Second):
		t.Fatal("no event within 5s")
	}
	return Event{}
}

func TestEvents(t *testing.T) {
	s := Subscribe(16)
	defer s.Unsubscribe()
	c := Open(&Conn{Remote: "127.0.0.1:1", Protocol: "chat"})
	ev := next(t, s)
	if ev.Type != EventOpened || ev.Connection.ID != c.ID() || ev.Connection.Remote != "127.0.0.1:1" {
		t.Fatalf("first event %+v, want opened for %d", ev, c.ID())
	}
	c.FromClient.Add(3)
	c.FromUpstream.Add(4)
	Close(c, errors.New("connection reset"))
	ev = next(t, s)
	if ev.Type != EventError || ev.Error != "connection reset" {
		t.Fatalf("second event %+v, want error", ev)
	}
	ev = next(t, s)
	if ev.Type != EventClosed || ev.Error != "connection reset" ||
		ev.Connection.BytesFromClient != 3 || ev.Connection.BytesToClient != 4 {
		t.Fatalf("third event %+v, want closed with the bytes and the error", ev)
	}

	c = Open(&Conn{})
	Close(c, nil)
	if ev := next(t, s); ev.Type != EventOpened {
		t.Fatalf("got %s, want opened", ev.Type)
	}
	if ev := next(t, s); ev.Type != EventClosed || ev.Error != "" {
		t.Fatalf("got %+v, want a clean closed", ev)
	}
}

func TestSlowSubscriberDropped(t *testing.T) {
	slow := Subscribe(2)
	fast := Subscribe(100)
	defer fast.Unsubscribe()
	for range 5 {
		Close(Open(&Conn{}), nil) // 10 events; nothing blocks
	}
	select {
	case <-slow.Dropped():
	case <-time.After(5 * time.Second):
		t.Fatal("slow subscriber was not dropped")
	}
	if n := len(fast.Events()); n != 10 {
		t.Fatalf("fast subscriber has %d events, want 10", n)
	}
	slow.Unsubscribe() // after being dropped: harmless
	fast.Unsubscribe()
	fast.Unsubscribe()
	select {
	case <-fast.Dropped():
	default:
		t.Fatal("Dropped not closed after Unsubscribe")
	}
}

func TestDialersFollowContext(t *testing.T) {
	ctx1, cancel1 := context.WithCancel(context.Background())
	ctx2, cancel2 := context.WithCancel(context.Background())
	defer cancel2()
	servers := []string{"127.0.0.1:1080"}
	AddDialer(ctx1, Dialer{Dialer: "wa.dialers.socks5", Servers: servers, Handler: "h", Destination: "d:1"})
	AddDialer(ctx1, Dialer{Dialer: "wa.dialers.socks5", Servers: servers, Handler: "h", Destination: "d:1"})
	AddDialer(ctx2, Dialer{Dialer: "wa.dialers.direct", Handler: "h", Destination: "d:2"})
	servers[0] = "changed" // AddDialer keeps its own copy
	got := Dialers()
	if len(got) != 2 || got[0].Dialer != "wa.dialers.direct" || got[1].Dialer != "wa.dialers.socks5" ||
		len(got[1].Servers) != 1 || got[1].Servers[0] != "127.0.0.1:1080" {
		t.Fatalf("Dialers() = %+v", got)
	}
	cancel1()
	deadline := time.Now().Add(5 * time.Second)
	for len(Dialers()) != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("dialers of a cancelled context still listed: %+v", Dialers())
		}
		time.Sleep(time.Millisecond)
	}
	if d := Dialers()[0]; d.Dialer != "wa.dialers.direct" {
		t.Fatalf("left %+v, want the direct dialer", d)
	}
}
