// localkube runs a real Kubernetes cluster for rolemesh's tests: embedded etcd, kube-apiserver,
// kube-controller-manager and kube-scheduler, plus the node components kubelet and kube-proxy, all
// from the official Kubernetes modules at the version pinned in go.mod. dev/node/up.sh starts the
// node (containerd, kubelet, kube-proxy) next to the control plane that `localkube up` runs.
//
// One binary serves several roles so the Kubernetes code is compiled and linked once:
//
//	localkube up --dir DIR          start etcd + apiserver + controller-manager + scheduler, write DIR/kubeconfig
//	localkube apiserver ARGS...     kube-apiserver
//	localkube controller-manager …  kube-controller-manager
//	localkube scheduler ARGS...     kube-scheduler
//	localkube kubelet ARGS...       kubelet
//	localkube proxy ARGS...         kube-proxy
//	kubectl ARGS...                 kubectl, when the binary is invoked through a link named kubectl
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"k8s.io/component-base/cli"
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
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
	case "scheduler":
		command := scheduler.NewSchedulerCommand()
		command.SetArgs(os.Args[2:])
		os.Exit(cli.Run(command))
	case "kubelet":
		command := kubelet.NewKubeletCommand(context.Background())
		command.SetArgs(os.Args[2:])
		os.Exit(cli.Run(command))
	case "proxy":
		command := proxy.NewProxyCommand()
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
	fmt.Fprintln(os.Stderr, "usage: localkube up --dir DIR | apiserver|controller-manager|scheduler|kubelet|proxy ARGS | kubectl ARGS")
	os.Exit(2)
}
