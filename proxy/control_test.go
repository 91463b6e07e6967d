package proxy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

func FuzzReadMessage(f *testing.F) {
	var buf bytes.Buffer
	writeMessage(&buf, controlRequest{Op: opPrepare, Channels: []string{"main", "nbd"}})
	f.Add(buf.Bytes())
	buf.Reset()
	writeMessage(&buf, controlResponse{Channels: []ChannelInfo{{Name: "main", Streams: 5, BytesForward: 1 << 30}}})
	f.Add(buf.Bytes())
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add(binary.BigEndian.AppendUint32(nil, 2))
	f.Fuzz(func(t *testing.T, data []byte) {
		var req controlRequest
		err := readMessage(bytes.NewReader(data), &req)
		if err != nil {
			if !errors.Is(err, errBadControl) {
				t.Fatalf("error %v does not wrap errBadControl", err)
			}
			return
		}
		var out bytes.Buffer
		if err := writeMessage(&out, req); err != nil {
			t.Fatalf("a decoded request does not encode: %v", err)
		}
		var again controlRequest
		if err := readMessage(&out, &again); err != nil {
			t.Fatalf("re-reading: %v", err)
		}
	})
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
	buf.Reset()
	body := []byte(`{"op":"abort"}{"op":"prepare"}`)
	buf.Write(binary.BigEndian.AppendUint32(nil, uint32(len(body))))
	buf.Write(body)
	if err := readMessage(&buf, &controlRequest{}); !errors.Is(err, errBadControl) {
		t.Fatalf("trailing data: %v", err)
	}
}
