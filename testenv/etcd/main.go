// etcd's own server main (go.etcd.io/etcd/v3's main.go calls the same function): Debian's etcd is
// 3.4, below the 3.5/3.6 that Kubernetes 1.3x runs with.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
