// Command coredns is CoreDNS with only the plugins the local cluster's
// Corefile uses. CoreDNS's own main links every plugin, and with them the
// cloud SDKs (Azure, Route 53, Cloud DNS) that a cluster DNS on a bridge
// never needs; this main picks plugins the way CoreDNS's plugin.cfg does.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() { coremain.Run() }
