package api

import (
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/statefulkv/store/internal/storage"
)

// precondition is what If-Match / If-None-Match ask of a write.
type precondition struct {
	// ifExists is If-Match: *, ifAbsent is If-None-Match: *.
	ifExists, ifAbsent bool
	// tagged is set when If-Match lists entity-tags. The write applies
	// only if the key is at one of versions: the listed tags this server
	// could have issued, newest first. With versions empty nothing listed
	// can match.
	tagged   bool
	versions []storage.Version
	// unmatchable names, for the message, the first tags that can never
	// match.
	unmatchable []string
}

// maxTagsNamed bounds how many tags a message repeats.
const maxTagsNamed = 3

// parsePreconditions reads If-Match and If-None-Match. Only a header that
// is syntactically broken, empty, or asks for what the store cannot do is
// an error (400); a well-formed entity-tag that this server never issued
// (ETags are opaque to clients) is a precondition that fails, which the
// write answers with 412 (RFC 9110 §8.8.3, §13.1.1).
func parsePreconditions(h http.Header) (precondition, error) {
	var pre precondition
	ifMatch, hasMatch := h["If-Match"]
	ifNone, hasNone := h["If-None-Match"]
	if hasMatch && hasNone {
		return pre, fmt.Errorf("%w: send If-Match or If-None-Match, not both", errInvalidPrecondition)
	}
	if hasNone {
		star, tags, err := parseTagList("If-None-Match", ifNone)
		if err != nil {
			return pre, err
		}
		if !star {
			return pre, fmt.Errorf("%w: If-None-Match supports only * (create only), got %q", errInvalidPrecondition, strings.Join(tagStrings(tags[:min(len(tags), maxTagsNamed)]), ", "))
		}
		pre.ifAbsent = true
	}
	if hasMatch {
		star, tags, err := parseTagList("If-Match", ifMatch)
		if err != nil {
			return pre, err
		}
		if star {
			pre.ifExists = true
			return pre, nil
		}
		pre.tagged = true
		for _, t := range tags {
			if v, ok := t.version(); ok {
				pre.versions = append(pre.versions, v)
			} else if len(pre.unmatchable) < maxTagsNamed {
				pre.unmatchable = append(pre.unmatchable, t.String())
			}
		}
		// Newest first: a client listing the versions it knows most
		// likely holds the current one last written. Sorted, then
		// compacted: a header may list many thousand tags.
		slices.SortFunc(pre.versions, func(a, b storage.Version) int {
			switch {
			case b.Less(a):
				return -1
			case a.Less(b):
				return 1
			}
			return 0
		})
		pre.versions = slices.Compact(pre.versions)
	}
	return pre, nil
}

// entityTag is one element of an If-Match / If-None-Match list.
type entityTag struct {
	weak bool
	// bare is the lenient unquoted form 1.5 (the quoted form is "1.5").
	bare   bool
	opaque string // without the quotes
}

func (t entityTag) String() string {
	switch {
	case t.bare:
		return t.opaque
	case t.weak:
		return `W/"` + t.opaque + `"`
	}
	return `"` + t.opaque + `"`
}

// version is the version t names if this server could have issued t. A
// weak tag never matches: If-Match compares strongly (RFC 9110 §8.8.3.2).
// A quoted tag matches byte for byte, so "01.5" is not "1.5".
func (t entityTag) version() (storage.Version, bool) {
	if t.weak {
		return storage.Version{}, false
	}
	v, err := storage.ParseVersion(t.opaque)
	if err != nil || (!t.bare && v.String() != t.opaque) {
		return storage.Version{}, false
	}
	return v, true
}

func tagStrings(tags []entityTag) []string {
	out := make([]string, len(tags))
	for i, t := range tags {
		out[i] = t.String()
	}
	return out
}

// parseTagList parses a field that is "*" or a comma-separated list of
// entity-tags (RFC 9110 §8.8.3: [W/]"<etagc>*"), over all the header
// lines it came in: several lines are one list (§5.3). Empty list elements
// between tags are ignored (§5.6.1), but an empty line, or a list of
// nothing, is an error: a client whose ETag variable is empty must not get
// an unconditional write. The unquoted form 1.5 is accepted for a version
// (people type it).
func parseTagList(name string, lines []string) (star bool, tags []entityTag, err error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s: %s", errInvalidPrecondition, name, fmt.Sprintf(format, args...))
	}
	elements := 0
	for _, line := range lines {
		if strings.Trim(line, " \t") == "" {
			return false, nil, bad(`the header is empty; send a quoted ETag such as "1.42", or *, or leave the header out`)
		}
		for i := 0; ; {
			for i < len(line) && (line[i] == ' ' || line[i] == '\t' || line[i] == ',') {
				i++
			}
			if i == len(line) {
				break
			}
			start := i
			var t entityTag
			switch {
			case line[i] == '*':
				star = true
				i++
			case line[i] == '"' || strings.HasPrefix(line[i:], `W/"`):
				if line[i] == 'W' {
					t.weak = true
					i += 2
				}
				end := strings.IndexByte(line[i+1:], '"')
				if end < 0 {
					return false, nil, bad("%q has no closing quote", line[start:])
				}
				t.opaque = line[i+1 : i+1+end]
				for j := 0; j < len(t.opaque); j++ {
					if c := t.opaque[j]; c < 0x21 || c == 0x7f {
						return false, nil, bad("entity-tag %q has byte 0x%02x, not allowed in an entity-tag", line[start:i+2+end], c)
					}
				}
				i += end + 2
				tags = append(tags, t)
			default:
				for i < len(line) && line[i] != ',' && line[i] != ' ' && line[i] != '\t' {
					i++
				}
				t = entityTag{bare: true, opaque: line[start:i]}
				if _, ok := t.version(); !ok {
					return false, nil, bad(`%q is not an entity-tag; send a quoted ETag such as "1.42", or *`, t.opaque)
				}
				tags = append(tags, t)
			}
			elements++
			for i < len(line) && (line[i] == ' ' || line[i] == '\t') {
				i++
			}
			if i < len(line) && line[i] != ',' {
				return false, nil, bad("unexpected %q after %q; separate entity-tags with commas", line[i:], line[start:i])
			}
		}
	}
	switch {
	case elements == 0:
		return false, nil, bad("the list is empty; send a quoted ETag such as \"1.42\", or *")
	case star && elements > 1:
		return false, nil, bad("* must stand alone, not in a list")
	}
	return star, tags, nil
}

// etag is the ETag header this server sends for v.
func etag(v storage.Version) string { return `"` + v.String() + `"` }
