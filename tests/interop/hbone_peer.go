// An independent HBONE peer built on Go's standard library alone (net/http's HTTP/2, crypto/tls):
// the other end for the sidecar's interop tests. Istio's own Go HBONE code uses the same HTTP/2.
//
//	hbone_peer client -addr HOST:PORT -cert C -key K -ca CA -authority H:P [-streams N] [-bytes B]
//	    N CONNECT streams over one TLS connection (the first alone, then N-1 at once), each sending
//	    B random bytes, ending its side (END_STREAM) and reading to the end; prints one JSON line.
//	hbone_peer server -listen HOST:PORT -cert C -key K -ca CA
//	    Accepts CONNECT streams (client certificate required, ALPN h2, TLS 1.3), dials
//	    127.0.0.1:<authority's port>, answers 200 and relays both ways, half-closes each way;
//	    prints "listening ADDR", then "tls-connection" for every TLS connection it accepts.
package main

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"sync"
)

func tlsConfig(cert, key, ca string) *tls.Config {
	pair, err := tls.LoadX509KeyPair(cert, key)
	check(err)
	pem, err := os.ReadFile(ca)
	check(err)
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		check(fmt.Errorf("no CA in %s", ca))
	}
	return &tls.Config{
		Certificates: []tls.Certificate{pair},
		RootCAs:      pool,
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{"h2"},
		ServerName:   "localhost",
	}
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "hbone_peer:", err)
		os.Exit(1)
	}
}

type streamResult struct {
	Status int    `json:"status"`
	Proto  string `json:"proto"`
	Exact  bool   `json:"exact"`
	Sent   int    `json:"sent"`
	Got    int    `json:"got"`
	Error  string `json:"error,omitempty"`
}

func client(args []string) {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	addr := fs.String("addr", "", "the HBONE listener")
	cert, key, ca := fs.String("cert", "", ""), fs.String("key", "", ""), fs.String("ca", "", "")
	authority := fs.String("authority", "", "CONNECT target")
	streams := fs.Int("streams", 1, "concurrent streams")
	size := fs.Int("bytes", 100000, "bytes per stream")
	check(fs.Parse(args))
	cfg := tlsConfig(*cert, *key, *ca)
	var handshakes int
	var mu sync.Mutex
	transport := &http.Transport{
		TLSClientConfig:   cfg,
		ForceAttemptHTTP2: true,
		DialTLS: func(network, address string) (net.Conn, error) {
			conn, err := tls.Dial(network, address, cfg)
			if err == nil {
				mu.Lock()
				handshakes++
				mu.Unlock()
			}
			return conn, err
		},
	}
	results := make([]streamResult, *streams)
	// The first stream alone: net/http dials once per request until an HTTP/2 connection is up.
	results[0] = oneStream(transport, *addr, *authority, *size)
	var wg sync.WaitGroup
	for i := 1; i < *streams; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			results[i] = oneStream(transport, *addr, *authority, *size)
		}(i)
	}
	wg.Wait()
	out, _ := json.Marshal(map[string]any{"handshakes": handshakes, "streams": results})
	fmt.Println(string(out))
}

func oneStream(transport *http.Transport, addr, authority string, size int) streamResult {
	payload := make([]byte, size)
	_, _ = rand.Read(payload)
	body, writer := io.Pipe()
	req := &http.Request{
		Method: "CONNECT",
		URL:    &url.URL{Scheme: "https", Host: addr},
		Host:   authority,
		Header: http.Header{},
		Body:   body,
	}
	resp, err := transport.RoundTrip(req)
	if err != nil {
		return streamResult{Error: err.Error()}
	}
	defer resp.Body.Close()
	res := streamResult{Status: resp.StatusCode, Proto: resp.Proto, Sent: size}
	if resp.StatusCode != http.StatusOK {
		writer.Close()
		return res
	}
	go func() {
		_, _ = writer.Write(payload)
		writer.Close() // END_STREAM: our side is done
	}()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		res.Error = err.Error()
	}
	res.Got, res.Exact = len(got), bytes.Equal(got, payload)
	return res
}

func server(args []string) {
	fs := flag.NewFlagSet("server", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "")
	cert, key, ca := fs.String("cert", "", ""), fs.String("key", "", ""), fs.String("ca", "", "")
	check(fs.Parse(args))
	ln, err := net.Listen("tcp", *listen)
	check(err)
	srv := &http.Server{
		TLSConfig: tlsConfig(*cert, *key, *ca),
		Handler:   http.HandlerFunc(relay),
		ConnState: func(_ net.Conn, state http.ConnState) {
			if state == http.StateNew {
				fmt.Println("tls-connection")
			}
		},
	}
	fmt.Println("listening", ln.Addr().String())
	check(srv.ServeTLS(ln, "", ""))
}

func relay(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodConnect {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	_, port, err := net.SplitHostPort(r.Host)
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	upstream, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", port))
	if err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	defer upstream.Close()
	w.WriteHeader(http.StatusOK)
	flusher := w.(http.Flusher)
	flusher.Flush()
	go func() {
		_, _ = io.Copy(upstream, r.Body)         // the peer's END_STREAM ends this copy
		_ = upstream.(*net.TCPConn).CloseWrite() // and becomes the upstream's FIN
	}()
	buf := make([]byte, 64*1024)
	for {
		n, err := upstream.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
			flusher.Flush()
		}
		if err != nil {
			return // returning ends the stream: END_STREAM toward the peer
		}
	}
}

func main() {
	if len(os.Args) < 2 {
		check(fmt.Errorf("usage: hbone_peer client|server ..."))
	}
	switch os.Args[1] {
	case "client":
		client(os.Args[2:])
	case "server":
		server(os.Args[2:])
	default:
		check(fmt.Errorf("unknown mode %q", os.Args[1]))
	}
}
