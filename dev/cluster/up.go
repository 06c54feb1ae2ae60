package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// The service-account issuer the TokenRequest API signs with. Tests and the controller only need
// it to be stable; moto's STS does not fetch the issuer's keys.
const serviceAccountIssuer = "https://kubernetes.default.svc.cluster.local"

type pki struct {
	dir string
}

func (p pki) path(name string) string { return filepath.Join(p.dir, name) }

func up(args []string) error {
	fs := flag.NewFlagSet("up", flag.ExitOnError)
	dir := fs.String("dir", "target/cluster", "state directory: PKI, etcd data, kubeconfig, logs")
	apiPort := fs.Int("port", 0, "kube-apiserver secure port on 127.0.0.1 (0 picks a free one)")
	verbosity := fs.Int("v", 0, "klog verbosity for the apiserver, controller-manager and scheduler")
	advertise := fs.String("advertise-address", "", "the node's IP: the apiserver listens on all addresses and "+
		"backs the kubernetes Service with this one so pods reach it (empty: loopback only, no node)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		return err
	}
	for _, sub := range []string{"pki", "etcd", "logs"} {
		if err := os.MkdirAll(filepath.Join(abs, sub), 0o700); err != nil {
			return err
		}
	}
	p := pki{dir: filepath.Join(abs, "pki")}
	advertiseIP := net.ParseIP("127.0.0.1")
	if *advertise != "" {
		if advertiseIP = net.ParseIP(*advertise); advertiseIP == nil {
			return fmt.Errorf("--advertise-address %q is not an IP", *advertise)
		}
	}
	token, err := writePKI(p, advertiseIP)
	if err != nil {
		return fmt.Errorf("writing PKI: %w", err)
	}

	etcdClient, etcdPeer := freePort(), freePort()
	if *apiPort == 0 {
		*apiPort = freePort()
	}
	etcd, err := startEtcd(filepath.Join(abs, "etcd"), etcdClient, etcdPeer)
	if err != nil {
		return fmt.Errorf("starting embedded etcd: %w", err)
	}
	defer etcd.Close()

	server := fmt.Sprintf("https://127.0.0.1:%d", *apiPort)
	kubeconfig := filepath.Join(abs, "kubeconfig")
	if err := writeKubeconfig(kubeconfig, server, p.path("ca.crt"), token); err != nil {
		return err
	}

	self, err := os.Executable()
	if err != nil {
		return err
	}
	v := strconv.Itoa(*verbosity)
	apiArgs := []string{
		"apiserver",
		"--etcd-servers=" + fmt.Sprintf("http://127.0.0.1:%d", etcdClient),
		"--secure-port=" + strconv.Itoa(*apiPort),
		"--tls-cert-file=" + p.path("apiserver.crt"),
		"--tls-private-key-file=" + p.path("apiserver.key"),
		"--client-ca-file=" + p.path("ca.crt"),
		"--token-auth-file=" + p.path("tokens.csv"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=" + serviceAccountIssuer,
		"--service-account-key-file=" + p.path("sa.pub"),
		"--service-account-signing-key-file=" + p.path("sa.key"),
		"--service-cluster-ip-range=10.96.0.0/16",
		// kubectl logs/exec/port-forward: the apiserver dials the kubelet at the node's InternalIP
		// as a cluster admin; the kubelet checks this certificate against the cluster CA.
		"--kubelet-client-certificate=" + p.path("apiserver-kubelet-client.crt"),
		"--kubelet-client-key=" + p.path("apiserver-kubelet-client.key"),
		"--kubelet-preferred-address-types=InternalIP,Hostname",
		"--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,ResourceQuota",
		"--allow-privileged=true",
		"--cert-dir=" + filepath.Join(abs, "pki", "apiserver-generated"),
		"--v=" + v,
	}
	if *advertise == "" {
		// The kubernetes Service cannot have a loopback endpoint, and there is no node to reach it.
		apiArgs = append(apiArgs, "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none")
	} else {
		// Pods reach the apiserver through the kubernetes Service, whose endpoint is the node's IP.
		apiArgs = append(apiArgs, "--bind-address=0.0.0.0", "--advertise-address="+*advertise)
	}
	kcmArgs := []string{
		"controller-manager",
		"--kubeconfig=" + kubeconfig,
		"--authentication-kubeconfig=" + kubeconfig,
		"--authorization-kubeconfig=" + kubeconfig,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=0",
		"--controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token,clusterrole-aggregation,root-ca-cert-publisher,replicaset,deployment,statefulset,daemonset,nodelifecycle,job,disruption,podgc,endpoint,endpointslice,endpointslicemirroring,ttl-after-finished",
		"--service-account-private-key-file=" + p.path("sa.key"),
		"--root-ca-file=" + p.path("ca.crt"),
		"--v=" + v,
	}
	schedulerArgs := []string{
		"scheduler",
		"--kubeconfig=" + kubeconfig,
		"--authentication-kubeconfig=" + kubeconfig,
		"--authorization-kubeconfig=" + kubeconfig,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=0",
		"--v=" + v,
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	apiserverProc, err := spawn(self, apiArgs, filepath.Join(abs, "logs", "kube-apiserver.log"))
	if err != nil {
		return err
	}
	defer terminate(apiserverProc)
	if err := waitReady(ctx, server, p.path("ca.crt"), token, 120*time.Second); err != nil {
		return fmt.Errorf("kube-apiserver did not become ready (see %s): %w", filepath.Join(abs, "logs", "kube-apiserver.log"), err)
	}
	kcmProc, err := spawn(self, kcmArgs, filepath.Join(abs, "logs", "kube-controller-manager.log"))
	if err != nil {
		return err
	}
	defer terminate(kcmProc)
	schedulerProc, err := spawn(self, schedulerArgs, filepath.Join(abs, "logs", "kube-scheduler.log"))
	if err != nil {
		return err
	}
	defer terminate(schedulerProc)

	fmt.Printf("localkube: apiserver %s ready, kubeconfig %s\n", server, kubeconfig)
	if err := os.WriteFile(filepath.Join(abs, "ready"), []byte(server+"\n"), 0o600); err != nil {
		return err
	}

	exited := make(chan string, 3)
	go func() { _ = apiserverProc.Wait(); exited <- "kube-apiserver" }()
	go func() { _ = kcmProc.Wait(); exited <- "kube-controller-manager" }()
	go func() { _ = schedulerProc.Wait(); exited <- "kube-scheduler" }()
	select {
	case <-ctx.Done():
		_ = os.Remove(filepath.Join(abs, "ready"))
		return nil
	case name := <-exited:
		_ = os.Remove(filepath.Join(abs, "ready"))
		return fmt.Errorf("%s exited; see %s", name, filepath.Join(abs, "logs"))
	case err := <-etcd.Err():
		return fmt.Errorf("etcd failed: %w", err)
	}
}

func spawn(self string, args []string, logPath string) (*exec.Cmd, error) {
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// The children die with us even if we are killed without a chance to clean up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", args[0], err)
	}
	return cmd, nil
}

func terminate(cmd *exec.Cmd) {
	if cmd.Process == nil || cmd.ProcessState != nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _, _ = cmd.Process.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
	}
}

func startEtcd(dataDir string, clientPort, peerPort int) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Dir = dataDir
	client := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", clientPort)}
	peer := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", peerPort)}
	cfg.ListenClientUrls = []url.URL{client}
	cfg.AdvertiseClientUrls = []url.URL{client}
	cfg.ListenPeerUrls = []url.URL{peer}
	cfg.AdvertisePeerUrls = []url.URL{peer}
	cfg.InitialCluster = cfg.Name + "=" + peer.String()
	cfg.LogLevel = "error"
	cfg.LogOutputs = []string{filepath.Join(filepath.Dir(dataDir), "logs", "etcd.log")}
	// Tests write much and keep little; keep the database small and fsync cheap.
	cfg.AutoCompactionMode = "revision"
	cfg.AutoCompactionRetention = "1000"
	cfg.UnsafeNoFsync = true
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, errors.New("etcd not ready after 60s")
	}
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func waitReady(ctx context.Context, server, caFile, token string, timeout time.Duration) error {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	client := &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, server+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Errorf("/readyz answered %s", resp.Status)
		} else {
			last = err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
	return last
}

// writePKI makes the cluster CA, the apiserver's serving certificate, the service-account signing
// key and the admin token, reusing what an earlier run left so a restarted cluster keeps its trust.
func writePKI(p pki, advertiseIP net.IP) (string, error) {
	tokenPath := p.path("tokens.csv")
	if _, err := os.Stat(tokenPath); err != nil {
		caKey, caCert, err := newCA()
		if err != nil {
			return "", err
		}
		if err := writePEM(p.path("ca.crt"), "CERTIFICATE", caCert.Raw); err != nil {
			return "", err
		}
		if err := writeKey(p.path("ca.key"), caKey); err != nil {
			return "", err
		}
		servingKey, servingDER, err := newServingCert(caKey, caCert, advertiseIP)
		if err != nil {
			return "", err
		}
		if err := writePEM(p.path("apiserver.crt"), "CERTIFICATE", servingDER); err != nil {
			return "", err
		}
		if err := writeKey(p.path("apiserver.key"), servingKey); err != nil {
			return "", err
		}
		kubeletClientKey, kubeletClientDER, err := newKubeletClientCert(caKey, caCert)
		if err != nil {
			return "", err
		}
		if err := writePEM(p.path("apiserver-kubelet-client.crt"), "CERTIFICATE", kubeletClientDER); err != nil {
			return "", err
		}
		if err := writeKey(p.path("apiserver-kubelet-client.key"), kubeletClientKey); err != nil {
			return "", err
		}
		saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return "", err
		}
		if err := writeKey(p.path("sa.key"), saKey); err != nil {
			return "", err
		}
		pub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
		if err != nil {
			return "", err
		}
		if err := writePEM(p.path("sa.pub"), "PUBLIC KEY", pub); err != nil {
			return "", err
		}
		raw := make([]byte, 24)
		if _, err := rand.Read(raw); err != nil {
			return "", err
		}
		line := hex.EncodeToString(raw) + ",admin,admin,system:masters\n"
		if err := os.WriteFile(tokenPath, []byte(line), 0o600); err != nil {
			return "", err
		}
	}
	data, err := os.ReadFile(tokenPath)
	if err != nil {
		return "", err
	}
	for i, c := range data {
		if c == ',' {
			return string(data[:i]), nil
		}
	}
	return "", fmt.Errorf("%s is malformed", tokenPath)
}

func newCA() (*ecdsa.PrivateKey, *x509.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "localkube-ca"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	return key, cert, err
}

func newServingCert(caKey *ecdsa.PrivateKey, ca *x509.Certificate, advertiseIP net.IP) (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.96.0.1"), advertiseIP},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	return key, der, err
}

// newKubeletClientCert is the apiserver's identity towards the kubelet (logs, exec, port-forward).
func newKubeletClientCert(caKey *ecdsa.PrivateKey, ca *x509.Certificate) (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(3),
		Subject:      pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	return key, der, err
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "EC PRIVATE KEY", der)
}

func writePEM(path, kind string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600)
}

func writeKubeconfig(path, server, caFile, token string) error {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	content := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: localkube
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: admin
  user:
    token: %s
contexts:
- name: localkube
  context:
    cluster: localkube
    user: admin
    namespace: default
current-context: localkube
`, server, base64.StdEncoding.EncodeToString(caPEM), token)
	return os.WriteFile(path, []byte(content), 0o600)
}
