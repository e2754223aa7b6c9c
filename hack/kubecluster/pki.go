package kubecluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// identity is one certificate the cluster needs: who it is (CN, O), what it
// is for (server and/or client auth) and where it is valid as a server.
type identity struct {
	file   string // pki/<file>.crt and .key
	cn     string
	orgs   []string
	server bool
	client bool
	dns    []string
	ips    []net.IP
}

// pki is the cluster's certificate authority and every key pair signed by
// it, as files under dir. They are made once and reused by later bring-ups
// (the node address and names never change), so `make kube-up` after a
// `make kube-down` spends no time on keys.
type pki struct {
	dir string
}

func (p pki) crt(name string) string { return filepath.Join(p.dir, name+".crt") }
func (p pki) key(name string) string { return filepath.Join(p.dir, name+".key") }

// ensure makes whatever is missing: the CA, the service-account signing key
// and one certificate per identity. A certificate whose files exist is kept.
func (p pki) ensure(ids []identity) error {
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	ca, caKey, err := p.loadOrCreateCA()
	if err != nil {
		return err
	}
	if !exists(p.key("sa")) {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("pki: service-account key: %w", err)
		}
		if err := writeKey(p.key("sa"), k); err != nil {
			return err
		}
		pub, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
		if err != nil {
			return fmt.Errorf("pki: service-account public key: %w", err)
		}
		if err := writePEM(filepath.Join(p.dir, "sa.pub"), "PUBLIC KEY", pub, 0o644); err != nil {
			return err
		}
	}
	for _, id := range ids {
		if exists(p.crt(id.file)) && exists(p.key(id.file)) {
			continue
		}
		if err := p.issue(ca, caKey, id); err != nil {
			return fmt.Errorf("pki: %s: %w", id.file, err)
		}
	}
	return nil
}

func (p pki) loadOrCreateCA() (*x509.Certificate, *ecdsa.PrivateKey, error) {
	if exists(p.crt("ca")) && exists(p.key("ca")) {
		return loadPair(p.crt("ca"), p.key("ca"))
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: CA key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "statefulkv-local-ca"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: CA: %w", err)
	}
	if err := writeKey(p.key("ca"), k); err != nil {
		return nil, nil, err
	}
	if err := writePEM(p.crt("ca"), "CERTIFICATE", der, 0o644); err != nil {
		return nil, nil, err
	}
	ca, err := x509.ParseCertificate(der)
	return ca, k, err
}

func (p pki) issue(ca *x509.Certificate, caKey *ecdsa.PrivateKey, id identity) error {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: id.cn, Organization: id.orgs},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(5 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		DNSNames:     id.dns,
		IPAddresses:  id.ips,
	}
	if id.server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	if id.client {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
	if err != nil {
		return err
	}
	if err := writeKey(p.key(id.file), k); err != nil {
		return err
	}
	return writePEM(p.crt(id.file), "CERTIFICATE", der, 0o644)
}

func loadPair(crtFile, keyFile string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	crtPEM, err := os.ReadFile(crtFile)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: %w", err)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: %w", err)
	}
	cb, _ := pem.Decode(crtPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return nil, nil, errors.New("pki: CA files are not PEM: delete the pki folder to make a new CA")
	}
	crt, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: CA certificate: %w", err)
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: CA key: %w", err)
	}
	return crt, key, nil
}

func writeKey(file string, k *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	return writePEM(file, "EC PRIVATE KEY", der, 0o600)
}

func writePEM(file, typ string, der []byte, mode os.FileMode) error {
	if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	return nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return n
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
