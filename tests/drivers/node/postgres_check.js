// postgres_check: named prepared statements through pgdoorman with postgres.js (`postgres`).
//
// Protocol patterns exercised:
//   - prepare: true (the default): the first time a query text is seen on a client connection,
//     postgres.js *describes first*: Parse(name)/Describe(statement)/Flush, waits for
//     ParameterDescription + RowDescription to learn the parameter types, then sends
//     Bind(name)/Execute/Sync. Later uses of the same text send only Bind/Execute/Sync.
//     A transaction pooler sees a Flush with no Sync (the server must stay with the client), and
//     later Binds of statements the lent server may never have parsed.
//   - Pipelining: several queries issued at once on the same connection (Promise.all inside
//     sql.begin, and bursts of concurrent queries on the pool) go out back to back, each with its
//     own Sync, before any reply is read.
//   - sql.begin(...) transactions (BEGIN ... COMMIT) carrying several prepared statements.
//
// Environment: PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE (read by postgres.js), WORKERS (default 8),
// ITERATIONS (default 200). Prints one summary line; exits 1 on any error or mismatch.
'use strict'

const postgres = require('postgres')

const WORKERS = parseInt(process.env.WORKERS || '8', 10)
const ITERATIONS = parseInt(process.env.ITERATIONS || '200', 10)

function check(ok, what) {
  if (!ok) throw new Error(what)
}

async function worker(sql, w) {
  for (let i = 0; i < ITERATIONS; i++) {
    const tag = `node-postgres-w${w}-i${i}`

    // A burst of concurrent queries on the pool: they may share a connection and be pipelined.
    const [[e1], [e2], [s]] = await Promise.all([
      sql`SELECT ${w}::int AS a, ${tag}::text AS b`,
      sql`SELECT ${w}::int AS a, ${tag + '-2'}::text AS b`,
      sql`SELECT ${w}::int + ${i}::int AS s`,
    ])
    check(e1.a === w && e1.b === tag, `echo mismatch: ${JSON.stringify(e1)}`)
    check(e2.a === w && e2.b === tag + '-2', `echo-2 mismatch: ${JSON.stringify(e2)}`)
    check(s.s === w + i, `sum mismatch: ${JSON.stringify(s)}`)

    // A transaction with three different prepared statements pipelined inside it.
    const k = (i % 5) + 1
    const [[mul], series, [echo]] = await sql.begin((tx) => [
      tx`SELECT ${w}::bigint * 100000 + ${i}::bigint AS n`,
      tx`SELECT g, ${tag}::text AS t FROM generate_series(1, ${k}::int) AS g`,
      tx`SELECT ${w}::int AS a, ${tag + '-tx'}::text AS b`,
    ])
    check(String(mul.n) === String(w * 100000 + i), `mul mismatch: ${JSON.stringify(mul)}`)
    check(series.length === k, `series: ${series.length} rows, want ${k}`)
    series.forEach((row, j) => {
      check(row.g === j + 1 && row.t === tag, `series row mismatch: ${JSON.stringify(row)}`)
    })
    check(echo.a === w && echo.b === tag + '-tx', `tx echo mismatch: ${JSON.stringify(echo)}`)
  }
}

async function main() {
  const sql = postgres({ max: WORKERS, prepare: true, onnotice: () => {} })
  const start = Date.now()
  const results = await Promise.allSettled(Array.from({ length: WORKERS }, (_, w) => worker(sql, w)))
  await sql.end({ timeout: 5 })
  const failed = results.filter((r) => r.status === 'rejected')
  results.forEach((r, w) => {
    if (r.status === 'rejected') console.error(`error: worker ${w}: ${r.reason && r.reason.stack}`)
  })
  const status = failed.length ? 'FAIL' : 'OK'
  console.log(`postgres_check ${status}: workers=${WORKERS} iterations=${ITERATIONS} ` +
    `failed_workers=${failed.length} elapsed=${((Date.now() - start) / 1000).toFixed(1)}s`)
  process.exit(failed.length ? 1 : 0)
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
