// pgx_check: named prepared statements through pgdoorman with pgx v4 (Debian package, GOPATH build).
//
// Protocol patterns exercised:
//   - pgx's default statement cache ("prepare" mode): the first Query/QueryRow of a given SQL text on
//     a client connection sends Parse(name="lrupsc_N_M")/Describe(statement)/Sync, and every later
//     execution sends only Bind(name)/Describe(portal)/Execute/Sync. Through a transaction pool the
//     later Binds land on server connections that never saw the Parse.
//   - An explicitly named statement prepared once per client connection in AfterConnect
//     (conn.Prepare "go_sum"), then used in many later transactions.
//   - Transactions via pool.Begin / tx.Commit carrying several statements, including a multi-row one.
//
// Environment: PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE (read by pgconn), WORKERS (default 8),
// ITERATIONS (default 200). Prints one summary line; exits 1 on any error or mismatch.
package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v4"
	"github.com/jackc/pgx/v4/pgxpool"
)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// worker runs `iterations` rounds; every value it selects embeds its own id and counter, so a reply
// that belonged to another client (or another statement) cannot compare equal.
func worker(ctx context.Context, pool *pgxpool.Pool, w, iterations int) error {
	for i := 0; i < iterations; i++ {
		tag := fmt.Sprintf("go-w%d-i%d", w, i)

		// 1. Outside a transaction: cached statement, params echoed back.
		var a int
		var b string
		if err := pool.QueryRow(ctx, "SELECT $1::int AS a, $2::text AS b", w, tag).Scan(&a, &b); err != nil {
			return fmt.Errorf("w%d i%d echo: %w", w, i, err)
		}
		if a != w || b != tag {
			return fmt.Errorf("w%d i%d echo mismatch: got (%d, %q)", w, i, a, b)
		}

		// 2. A transaction with three different prepared statements.
		tx, err := pool.Begin(ctx)
		if err != nil {
			return fmt.Errorf("w%d i%d begin: %w", w, i, err)
		}
		var n int64
		if err := tx.QueryRow(ctx, "SELECT $1::bigint * 100000 + $2::bigint", w, i).Scan(&n); err != nil {
			_ = tx.Rollback(ctx)
			return fmt.Errorf("w%d i%d mul: %w", w, i, err)
		}
		if n != int64(w)*100000+int64(i) {
			_ = tx.Rollback(ctx)
			return fmt.Errorf("w%d i%d mul mismatch: got %d", w, i, n)
		}
		// "go_sum" was prepared by name in AfterConnect, possibly on a different server connection.
		var s int
		if err := tx.QueryRow(ctx, "go_sum", w, i).Scan(&s); err != nil {
			_ = tx.Rollback(ctx)
			return fmt.Errorf("w%d i%d go_sum: %w", w, i, err)
		}
		if s != w+i {
			_ = tx.Rollback(ctx)
			return fmt.Errorf("w%d i%d go_sum mismatch: got %d", w, i, s)
		}
		// Multi-row result: (1..k, tag) with k depending on the iteration.
		k := i%5 + 1
		rows, err := tx.Query(ctx, "SELECT g, $1::text FROM generate_series(1, $2::int) AS g", tag, k)
		if err != nil {
			_ = tx.Rollback(ctx)
			return fmt.Errorf("w%d i%d series: %w", w, i, err)
		}
		got := 0
		for rows.Next() {
			var g int
			var t string
			if err := rows.Scan(&g, &t); err != nil {
				rows.Close()
				_ = tx.Rollback(ctx)
				return fmt.Errorf("w%d i%d series scan: %w", w, i, err)
			}
			got++
			if g != got || t != tag {
				rows.Close()
				_ = tx.Rollback(ctx)
				return fmt.Errorf("w%d i%d series row mismatch: got (%d, %q)", w, i, g, t)
			}
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			_ = tx.Rollback(ctx)
			return fmt.Errorf("w%d i%d series: %w", w, i, err)
		}
		if got != k {
			_ = tx.Rollback(ctx)
			return fmt.Errorf("w%d i%d series: %d rows, want %d", w, i, got, k)
		}
		if err := tx.Commit(ctx); err != nil {
			return fmt.Errorf("w%d i%d commit: %w", w, i, err)
		}
	}
	return nil
}

func main() {
	workers := envInt("WORKERS", 8)
	iterations := envInt("ITERATIONS", 200)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()

	cfg, err := pgxpool.ParseConfig("") // everything from PG* environment variables
	if err != nil {
		fmt.Printf("pgx_check FAIL: config: %v\n", err)
		os.Exit(1)
	}
	cfg.MaxConns = int32(workers) // one client connection per worker at full load
	cfg.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
		_, err := c.Prepare(ctx, "go_sum", "SELECT $1::int + $2::int")
		return err
	}
	pool, err := pgxpool.ConnectConfig(ctx, cfg)
	if err != nil {
		fmt.Printf("pgx_check FAIL: connect: %v\n", err)
		os.Exit(1)
	}
	defer pool.Close()

	var wg sync.WaitGroup
	var failures int64
	errs := make(chan error, workers)
	start := time.Now()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			if err := worker(ctx, pool, w, iterations); err != nil {
				atomic.AddInt64(&failures, 1)
				errs <- err
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
	}
	status := "OK"
	if failures > 0 {
		status = "FAIL"
	}
	fmt.Printf("pgx_check %s: workers=%d iterations=%d failed_workers=%d elapsed=%.1fs\n",
		status, workers, iterations, failures, time.Since(start).Seconds())
	if failures > 0 {
		os.Exit(1)
	}
}
