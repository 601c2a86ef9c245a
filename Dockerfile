# Multi-stage build: static tatd and pg_tat (cgo for the PostgreSQL parser,
# linked statically), in a minimal image running as a non-root user.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=1 go build -tags osusergo,netgo -trimpath -ldflags '-s -w -linkmode external -extldflags "-static"' -o /out/ ./cmd/...

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/tatd /out/pg_tat /usr/local/bin/
COPY install.sql /usr/share/pg_tat/install.sql
USER nonroot:nonroot
ENTRYPOINT ["/usr/local/bin/tatd"]
