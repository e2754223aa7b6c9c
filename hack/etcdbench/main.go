// Command etcdbench is etcd's own benchmark tool (tools/benchmark in
// go.etcd.io/etcd/v3), built from the Go module proxy. `go install` cannot
// build it because etcd's root go.mod has replace directives; this wrapper
// module pins them instead. bench-compare drives etcd with it.
package main

import (
	"fmt"
	"os"

	"go.etcd.io/etcd/v3/tools/benchmark/cmd"
)

func main() {
	if err := cmd.RootCmd.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
