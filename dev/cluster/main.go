// localkube runs a real Kubernetes control plane on loopback for rolemesh's tests: embedded etcd,
// kube-apiserver and kube-controller-manager, all from the official Kubernetes modules at the
// version pinned in go.mod. There is no kubelet: pods are stored, not run.
//
// One binary serves several roles so the Kubernetes code is compiled and linked once:
//
//	localkube up --dir DIR          start etcd + apiserver + controller-manager, write DIR/kubeconfig
//	localkube apiserver ARGS...     kube-apiserver
//	localkube controller-manager …  kube-controller-manager
//	kubectl ARGS...                 kubectl, when the binary is invoked through a link named kubectl
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"k8s.io/component-base/cli"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
)

func main() {
	name := filepath.Base(os.Args[0])
	if strings.HasPrefix(name, "kubectl") {
		command := kubectl.NewDefaultKubectlCommand()
		if err := cli.RunNoErrOutput(command); err != nil {
			kubectlutil.CheckErr(err)
		}
		return
	}
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "up":
		if err := up(os.Args[2:]); err != nil {
			fmt.Fprintf(os.Stderr, "localkube up: %v\n", err)
			os.Exit(1)
		}
	case "apiserver":
		command := apiserver.NewAPIServerCommand()
		command.SetArgs(os.Args[2:])
		os.Exit(cli.Run(command))
	case "controller-manager":
		command := controllermanager.NewControllerManagerCommand()
		command.SetArgs(os.Args[2:])
		os.Exit(cli.Run(command))
	case "kubectl":
		os.Args = append([]string{"kubectl"}, os.Args[2:]...)
		command := kubectl.NewDefaultKubectlCommand()
		if err := cli.RunNoErrOutput(command); err != nil {
			kubectlutil.CheckErr(err)
		}
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: localkube up --dir DIR | apiserver ARGS | controller-manager ARGS | kubectl ARGS")
	os.Exit(2)
}
