package node

import (
	"context"
	"errors"
	"fmt"

	"github.com/statefulkv/store/internal/replication"
	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// ErrInvalidRequest means a peer's call made no sense (an unknown ack
// level, a notice without a leader); nothing was done.
var ErrInvalidRequest = errors.New("invalid request from a peer")

// Service is what this node serves to its peers through the transport:
// the same methods as for clients, marked as forwarded so that nothing is
// forwarded twice.
func (n *Node) Service() transport.Service { return service{n} }

type service struct{ n *Node }

func (s service) Write(ctx context.Context, w transport.Write) (transport.WriteReply, error) {
	ack, err := replication.ParseAck(w.Ack)
	if err != nil {
		return transport.WriteReply{}, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	if s.n.cfg.Leadership == nil {
		return transport.WriteReply{}, fmt.Errorf("%w: %s is a single node", ErrNotLeader, s.n.cfg.Self)
	}
	res, err := s.n.Write(ctx, Write{
		Key: w.Key, Value: w.Value, Delete: w.Delete,
		IfMatch: storage.Version(w.IfMatch), IfExists: w.IfExists, IfAbsent: w.IfAbsent,
		Ack: ack, RequestID: w.RequestID,
	}, Origin{ForwardedBy: w.From, SeenEpoch: w.SeenEpoch})
	if err != nil {
		return transport.WriteReply{}, err
	}
	return transport.WriteReply{Version: transport.Version(res.Version), Created: res.Created, Deleted: res.Deleted, Leader: res.Leader, Epoch: res.Epoch}, nil
}

func (s service) Read(ctx context.Context, r transport.Read) (transport.ReadReply, error) {
	if s.n.cfg.Leadership == nil {
		return transport.ReadReply{}, fmt.Errorf("%w: %s is a single node", ErrNotLeader, s.n.cfg.Self)
	}
	res, err := s.n.Get(ctx, r.Key, ReadOptions{Stale: r.Stale, MaxStale: r.MaxStale}, Origin{ForwardedBy: r.From, SeenEpoch: r.SeenEpoch})
	if err != nil {
		return transport.ReadReply{}, err
	}
	return transport.ReadReply{
		Value: res.Entry.Value, Version: transport.Version(res.Entry.Version),
		ServedBy: res.ServedBy, Consistency: res.Consistency,
		HasLastContact: res.HasLastContact, LastContact: res.LastContact,
	}, nil
}

func (s service) List(ctx context.Context, l transport.List) (transport.ListReply, error) {
	if s.n.cfg.Leadership == nil {
		return transport.ListReply{}, fmt.Errorf("%w: %s is a single node", ErrNotLeader, s.n.cfg.Self)
	}
	res, err := s.n.List(ctx, ListOptions{Prefix: l.Prefix, After: l.After, Limit: l.Limit}, Origin{ForwardedBy: l.From, SeenEpoch: l.SeenEpoch})
	if err != nil {
		return transport.ListReply{}, err
	}
	out := transport.ListReply{Items: make([]transport.Item, len(res.Entries)), More: res.More}
	for i, e := range res.Entries {
		out.Items[i] = transport.Item{Key: e.Key, Version: transport.Version(e.Version), Value: e.Value}
	}
	return out, nil
}

func (s service) Leader(_ context.Context, nt transport.LeaderNotice) error {
	if nt.Leader == "" || nt.Epoch == 0 {
		return fmt.Errorf("%w: a leader notice needs the leader and its epoch", ErrInvalidRequest)
	}
	if s.n.cfg.Leadership != nil {
		s.n.cfg.Leadership.HintLeader(nt.Leader, nt.Epoch)
	}
	return nil
}

func (s service) LeaseReleased(context.Context, transport.LeaseReleased) error {
	if s.n.cfg.Leadership != nil {
		s.n.cfg.Leadership.Nudge()
	}
	return nil
}
