package proxy

import (
	"encoding/json"

	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/migtun/migtun/control"
)

func FuzzReadMessage(f *testing.F) {
	var buf bytes.Buffer
	writeMessage(&buf, controlRequest{Op: opPrepare, Channels: []string{"main", "nbd"}})
	f.Add(bytes.Clone(buf.Bytes()))
	buf.Reset()
	writeMessage(&buf, controlResponse{Channels: []control.ChannelInfo{{Name: "main", Streams: 5, BytesForward: 1 << 30}}})
	f.Add(bytes.Clone(buf.Bytes()))
	buf.Reset()
	writeMessage(&buf, controlResponse{Error: "VM busy", Code: control.CodeBusy, VM: json.RawMessage(`{"qemu":"10.0.2"}`)})
	f.Add(bytes.Clone(buf.Bytes()))
	for _, req := range []controlRequest{
		{Op: "vm-prepare", Session: "0123456789abcdef0123456789abcdef", Token: "t",
			VM: json.RawMessage(`{"vm":"vm1","prepare":{"disks":[{"node":"disk0","size":1}],"capabilities":{"multifd":true},"multifd_channels":4}}`)},
		{Op: "vm-finish", Session: "0123456789abcdef0123456789abcdef", VM: json.RawMessage(`{"vm":"vm1","resume":true}`)},
		{Op: "vm-recover", Session: "0123456789abcdef0123456789abcdef", VM: json.RawMessage(`{"vm":"vm1","pause":2}`)},
		{Op: "vm-abort", Session: "0123456789abcdef0123456789abcdef", VM: json.RawMessage(`{"vm":"vm1","reason":"cancelled"}`)},
		{Op: opAbort, Session: "0123456789abcdef0123456789abcdef", Token: "t", Reason: "no stream for 2m0s", Expired: true},
	} {
		buf.Reset()
		writeMessage(&buf, req)
		f.Add(bytes.Clone(buf.Bytes()))
	}
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add(binary.BigEndian.AppendUint32(nil, 2))
	f.Fuzz(func(t *testing.T, data []byte) {
		// The destination decodes requests, the source responses.
		roundTrip[controlRequest](t, data)
		roundTrip[controlResponse](t, data)
	})
}

// roundTrip decodes data as a control message of type M, and checks that
// a failure wraps errBadControl and that a decoded message encodes and
// decodes again.
func roundTrip[M any](t *testing.T, data []byte) {
	var m M
	err := readMessage(bytes.NewReader(data), &m)
	if err != nil {
		if !errors.Is(err, errBadControl) {
			t.Fatalf("%T: error %v does not wrap errBadControl", m, err)
		}
		return
	}
	var out bytes.Buffer
	if err := writeMessage(&out, m); err != nil {
		t.Fatalf("a decoded %T does not encode: %v", m, err)
	}
	var again M
	if err := readMessage(&out, &again); err != nil {
		t.Fatalf("re-reading a %T: %v", m, err)
	}
}

func TestReadMessageLimits(t *testing.T) {
	big := binary.BigEndian.AppendUint32(nil, maxControlBody+1)
	if err := readMessage(bytes.NewReader(big), &controlRequest{}); !errors.Is(err, errBadControl) {
		t.Fatalf("oversized body: %v", err)
	}
	var buf bytes.Buffer
	writeMessage(&buf, map[string]any{"op": "prepare", "surprise": 1})
	if err := readMessage(&buf, &controlRequest{}); !errors.Is(err, errBadControl) {
		t.Fatalf("unknown field: %v", err)
	}
	// An answer's unknown field is ignored: its error text still arrives.
	buf.Reset()
	writeMessage(&buf, map[string]any{"error": "no route", "code": "not_found", "added_later": 1})
	var resp controlResponse
	if err := readResponse(&buf, &resp); err != nil || resp.Error != "no route" {
		t.Fatalf("an answer with a field added later: %+v %v", resp, err)
	}
	buf.Reset()
	body := []byte(`{"op":"abort"}{"op":"prepare"}`)
	buf.Write(binary.BigEndian.AppendUint32(nil, uint32(len(body))))
	buf.Write(body)
	if err := readMessage(&buf, &controlRequest{}); !errors.Is(err, errBadControl) {
		t.Fatalf("trailing data: %v", err)
	}
}
