// Command pause is the sandbox process of every pod on the local cluster:
// it holds the pod's namespaces open and does nothing else. As PID 1 of a
// pod that shares its process namespace it must also reap the orphans that
// are reparented to it, or they stay zombies. It exits on SIGTERM or SIGINT,
// which is how the runtime stops a sandbox.
//
// It is built static (CGO_ENABLED=0) and packed into an image by the module
// root (see hack/kube.sh), so the cluster needs no registry for its sandbox.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		reap()
	}
}

// reap collects every child that has exited; one SIGCHLD can stand for
// several exits, so it loops until none is left.
func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}
