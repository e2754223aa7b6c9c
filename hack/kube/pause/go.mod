module github.com/statefulkv/store/hack/kube/pause

go 1.26.0
