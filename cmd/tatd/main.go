// Command tatd is the pg_tat sidecar: it LISTENs for jobs queued by
// tat.alter(...) and runs them with the replicate engine.
//
//	TAT_DATABASE_URL=postgres://... tatd            run the sidecar
//	TAT_DATABASE_URL=postgres://... tatd --install  install or upgrade schema tat, then exit
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/kelseyhightower/envconfig"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sirupsen/logrus"

	pgtat "github.com/pgtat/pg_tat"
	"github.com/pgtat/pg_tat/listener"
)

// version is set at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

// Config is read from the environment with prefix TAT_.
type Config struct {
	DatabaseURL   string        `envconfig:"DATABASE_URL" required:"true" desc:"PostgreSQL URL of the database with schema tat"`
	Channel       string        `envconfig:"CHANNEL" default:"tat" desc:"LISTEN channel (see tat.settings 'channel')"`
	MaxJobs       int           `envconfig:"MAX_JOBS" default:"4" desc:"migrations run at the same time"`
	LogLevel      string        `envconfig:"LOG_LEVEL" default:"info" desc:"debug, info, warn, error"`
	LogFormat     string        `envconfig:"LOG_FORMAT" default:"text" desc:"text or json"`
	PollInterval  time.Duration `envconfig:"POLL_INTERVAL" default:"5s" desc:"how often to look for jobs without a notification"`
	MetricsAddr   string        `envconfig:"METRICS_ADDR" desc:"address of the /metrics and /healthz endpoints (e.g. :9187); empty = off"`
	ShutdownGrace time.Duration `envconfig:"SHUTDOWN_GRACE" default:"10s" desc:"on SIGTERM, how long running jobs may take to reach a safe point"`
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("tatd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	install := fs.Bool("install", false, "install or upgrade schema tat in TAT_DATABASE_URL and exit")
	showVersion := fs.Bool("version", false, "print the version and exit")
	help := fs.Bool("help", false, "print this help and exit")
	usage := func(w io.Writer) {
		fmt.Fprintf(w, "tatd %s: the pg_tat sidecar; runs jobs queued with tat.alter(...).\n\nUsage: tatd [--install] [--version] [--help]\n\n", version)
		fs.SetOutput(w)
		fs.PrintDefaults()
		fs.SetOutput(stderr)
		fmt.Fprintln(w, "\nEnvironment:")
		tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
		_ = envconfig.Usagef("tat", &Config{}, tw, "{{range .}}  {{usage_key .}}\t{{usage_default .}}\t{{usage_description .}}\n{{end}}")
		_ = tw.Flush()
	}
	fs.Usage = func() { usage(stderr) }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *help {
		usage(stdout)
		return 0
	}
	if *showVersion {
		fmt.Fprintln(stdout, "tatd", version)
		return 0
	}
	var cfg Config
	if err := envconfig.Process("tat", &cfg); err != nil {
		fmt.Fprintln(stderr, "tatd:", err)
		return 2
	}
	if cfg.DatabaseURL == "" {
		fmt.Fprintln(stderr, "tatd: TAT_DATABASE_URL is required (see tatd --help)")
		return 2
	}
	log, err := newLogger(cfg, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "tatd:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	if *install {
		if err := installSchema(ctx, cfg.DatabaseURL); err != nil {
			log.WithError(err).Error("install failed")
			return 1
		}
		log.Info("schema tat installed")
		return 0
	}
	l, err := listener.New(listener.Config{
		DatabaseURL:   cfg.DatabaseURL,
		Channel:       cfg.Channel,
		MaxJobs:       cfg.MaxJobs,
		PollInterval:  cfg.PollInterval,
		Log:           log,
		ShutdownGrace: cfg.ShutdownGrace,
	})
	if err != nil {
		log.WithError(err).Error("bad configuration")
		return 2
	}
	if cfg.MetricsAddr != "" {
		go serveMetrics(ctx, cfg.MetricsAddr, l, log)
	}
	log.WithFields(logrus.Fields{"version": version, "max_jobs": cfg.MaxJobs, "runner": l.RunnerID()}).Info("tatd starting")
	if err := l.Run(ctx); err != nil {
		log.WithError(err).Error("tatd stopped")
		return 1
	}
	return 0
}

func newLogger(cfg Config, out io.Writer) (*logrus.Logger, error) {
	log := logrus.New()
	log.SetOutput(out)
	lvl, err := logrus.ParseLevel(cfg.LogLevel)
	if err != nil {
		return nil, fmt.Errorf("TAT_LOG_LEVEL: %w", err)
	}
	log.SetLevel(lvl)
	switch cfg.LogFormat {
	case "", "text":
		log.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	case "json":
		log.SetFormatter(&logrus.JSONFormatter{})
	default:
		return nil, fmt.Errorf("TAT_LOG_FORMAT must be text or json, not %q", cfg.LogFormat)
	}
	return log, nil
}

// installSchema runs install.sql (idempotent) in one transaction.
func installSchema(ctx context.Context, url string) error {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	tx, err := conn.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if _, err := tx.Exec(ctx, pgtat.InstallSQL); err != nil {
		return fmt.Errorf("install.sql: %w", err)
	}
	return tx.Commit(ctx)
}

// metricsHandler serves /metrics (the listener's collector plus the Go
// runtime's) and /healthz.
func metricsHandler(l *listener.Listener) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(l.Metrics(), collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	return mux
}

// serveMetrics answers /metrics and /healthz until ctx ends.
func serveMetrics(ctx context.Context, addr string, l *listener.Listener, log logrus.FieldLogger) {
	srv := &http.Server{Addr: addr, Handler: metricsHandler(l), ReadHeaderTimeout: 5 * time.Second,
		BaseContext: func(net.Listener) context.Context { return ctx }}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	log.WithField("addr", addr).Info("serving /metrics and /healthz")
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.WithError(err).Error("metrics endpoint")
	}
}
