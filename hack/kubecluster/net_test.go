package kubecluster

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestShellFields_SplitsIPTablesRules(t *testing.T) {
	tests := []struct {
		line string
		want []string
	}{
		{`-A INPUT -j KUBE-FIREWALL`, []string{"-A", "INPUT", "-j", "KUBE-FIREWALL"}},
		{`-A KUBE-FIREWALL ! -s 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -j DROP`,
			[]string{"-A", "KUBE-FIREWALL", "!", "-s", "127.0.0.0/8", "-m", "comment", "--comment", "block incoming localnet connections", "-j", "DROP"}},
		{`-A X -m comment --comment "say \"hi\"" -j ACCEPT`, []string{"-A", "X", "-m", "comment", "--comment", `say "hi"`, "-j", "ACCEPT"}},
		{`-A X -m comment --comment "" -j ACCEPT`, []string{"-A", "X", "-m", "comment", "--comment", "", "-j", "ACCEPT"}},
		{"  ", nil},
	}
	for _, tt := range tests {
		if diff := cmp.Diff(tt.want, shellFields(tt.line)); diff != "" {
			t.Errorf("shellFields(%q) (-want +got):\n%s", tt.line, diff)
		}
	}
}

func TestOurs_MatchesOnlyClusterChainsAndRules(t *testing.T) {
	for s, want := range map[string]bool{
		"KUBE-SERVICES":     true,
		"CNI-HOSTPORT-DNAT": true,
		`-A FORWARD -m comment --comment "statefulkv-kube" -j ACCEPT`: true,
		"DOCKER-USER":                    false,
		"-A FORWARD -j DOCKER-ISOLATION": false,
	} {
		if got := ours(s); got != want {
			t.Errorf("ours(%q) = %v, want %v", s, got, want)
		}
	}
}

func TestNormalizeRef_SpellsNamesAsContainerdStoresThem(t *testing.T) {
	for in, want := range map[string]string{
		"statefulkv/store:dev":     "docker.io/statefulkv/store:dev",
		"busybox:1":                "docker.io/library/busybox:1",
		"statefulkv.local/pause:1": "statefulkv.local/pause:1",
		"localhost/x:1":            "localhost/x:1",
		"localhost:5000/x:1":       "localhost:5000/x:1",
	} {
		if got := normalizeRef(in); got != want {
			t.Errorf("normalizeRef(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestUnescapeMount_UndoesOctalEscapes(t *testing.T) {
	if got := unescapeMount(`/a\040b/c`); got != "/a b/c" {
		t.Errorf("unescapeMount = %q", got)
	}
}
