// vcsim for hypersdk's tests: govmomi's vCenter simulator (Debian's
// golang-github-vmware-govmomi-dev) on one address, with the vAPI simulator for
// tags. Prints {"url": ...} on stdout once it serves; stops on SIGTERM/SIGINT.
package main

import (
	"crypto/tls"
	"encoding/json"
	"flag"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator" // registers /rest (tagging)
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	username := flag.String("username", "user", "the one valid user name")
	password := flag.String("password", "pass", "its password")
	machines := flag.Int("vm", 2, "VMs per resource pool (2 pools: cluster and standalone host)")
	plain := flag.Bool("http", false, "serve plain HTTP instead of HTTPS")
	certFile := flag.String("cert", "", "TLS certificate (PEM); default: Go's built-in test certificate")
	keyFile := flag.String("key", "", "its private key (PEM)")
	flag.Parse()

	model := simulator.VPX()
	model.Machine = *machines
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, *password)}
	if !*plain {
		model.Service.TLS = new(tls.Config)
		if *certFile != "" {
			cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
			if err != nil {
				log.Fatal(err)
			}
			model.Service.TLS.Certificates = []tls.Certificate{cert}
		}
	}
	model.Service.RegisterEndpoints = true
	server := model.Service.NewServer()

	endpoint := *server.URL
	endpoint.User = nil
	datastores := map[string]string{}
	for _, ds := range simulator.Map.All("Datastore") {
		d := ds.(*simulator.Datastore)
		datastores[d.Name] = d.Info.GetDatastoreInfo().Url
	}
	out := json.NewEncoder(os.Stdout)
	if err := out.Encode(map[string]any{"url": endpoint.String(), "datastores": datastores}); err != nil {
		log.Fatal(err)
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	server.Close()
	model.Remove()
}
