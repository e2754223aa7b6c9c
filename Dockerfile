# Multi-stage: a static binary on distroless, running as the nonroot user.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/store ./cmd/store

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/store /store
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/store"]
