// Package matchers holds the layer4 connection matchers that recognise
// WhatsApp's protocols on a shared port: wa_xmpp (WhatsApp chat, the ED
// edge-routing prologue, XMPP streams) and wa_silent (a client that sends
// nothing).
package matchers
