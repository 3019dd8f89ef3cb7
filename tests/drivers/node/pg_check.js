// pg_check: named prepared statements through pgdoorman with node-postgres (`pg`).
//
// Protocol patterns exercised:
//   - Named queries {name, text, values}: the first use on a client connection sends
//     Parse(name)/Bind/Describe(portal)/Execute/Sync; pg then remembers the name per connection and
//     every later use sends only Bind(name)/Describe/Execute/Sync - which a transaction pooler may
//     deliver to a server connection that never saw the Parse.
//   - Several distinct named statements, used both outside and inside BEGIN/COMMIT transactions.
//   - An error inside a transaction (division by zero from a named statement), ROLLBACK, and reuse
//     of the same names afterwards.
//   - Odd-numbered workers use pg's `pipeline: true` mode, which writes BEGIN, the named queries and
//     COMMIT back to back without waiting for replies (several Syncs outstanding at once).
//
// Environment: PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE (read by pg), WORKERS (default 8),
// ITERATIONS (default 200). Prints one summary line; exits 1 on any error or mismatch.
'use strict'

const { Client } = require('pg')

const WORKERS = parseInt(process.env.WORKERS || '8', 10)
const ITERATIONS = parseInt(process.env.ITERATIONS || '200', 10)

const ECHO = 'SELECT $1::int AS a, $2::text AS b'
const MUL = 'SELECT $1::bigint * 100000 + $2::bigint AS n'
const SERIES = 'SELECT g, $1::text AS t FROM generate_series(1, $2::int) AS g'
const DIV = 'SELECT 100 / $1::int AS q'

function check(ok, what) {
  if (!ok) throw new Error(what)
}

async function echo(client, w, tag) {
  const r = await client.query({ name: 'echo', text: ECHO, values: [w, tag] })
  check(r.rows.length === 1 && r.rows[0].a === w && r.rows[0].b === tag,
    `echo mismatch: want (${w}, ${tag}) got ${JSON.stringify(r.rows)}`)
}

// Pipeline mode: issue every query at once and let pg write them back to back. Otherwise one by one
// (queueing queries on a non-pipelined client is deprecated in pg 8).
async function run(steps, pipeline) {
  if (pipeline) return Promise.all(steps.map((step) => step()))
  const results = []
  for (const step of steps) results.push(await step())
  return results
}

async function worker(w) {
  const pipeline = w % 2 === 1
  const client = new Client({ pipeline })
  await client.connect()
  try {
    for (let i = 0; i < ITERATIONS; i++) {
      const tag = `node-pg-w${w}-i${i}`

      // Outside a transaction.
      await echo(client, w, tag)

      // A transaction with three named statements. In pipeline mode all queries are written at once.
      const k = (i % 5) + 1
      const steps = [
        () => client.query('BEGIN'),
        () => client.query({ name: 'mul', text: MUL, values: [w, i] }),
        () => client.query({ name: 'series', text: SERIES, values: [tag, k] }),
        () => echo(client, w, tag + '-tx'),
        () => client.query('COMMIT'),
      ]
      const [, mul, series] = await run(steps, pipeline)
      check(mul.rows[0].n === String(w * 100000 + i), `mul mismatch: got ${JSON.stringify(mul.rows)}`)
      check(series.rows.length === k, `series: ${series.rows.length} rows, want ${k}`)
      series.rows.forEach((row, j) => {
        check(row.g === j + 1 && row.t === tag, `series row mismatch: ${JSON.stringify(row)}`)
      })

      // Every tenth iteration: an error from a named statement inside a transaction, then rollback.
      if (i % 10 === 0) {
        await client.query('BEGIN')
        const ok = await client.query({ name: 'div', text: DIV, values: [4] })
        check(ok.rows[0].q === 25, `div mismatch: ${JSON.stringify(ok.rows)}`)
        let failed = false
        try {
          await client.query({ name: 'div', text: DIV, values: [0] })
        } catch (e) {
          failed = e.code === '22012' // division_by_zero
          if (!failed) throw e
        }
        check(failed, 'division by zero did not fail')
        await client.query('ROLLBACK')
        await echo(client, w, tag + '-after-rollback')
      }
    }
  } finally {
    await client.end()
  }
}

async function main() {
  const start = Date.now()
  const results = await Promise.allSettled(Array.from({ length: WORKERS }, (_, w) => worker(w)))
  const failed = results.filter((r) => r.status === 'rejected')
  results.forEach((r, w) => {
    if (r.status === 'rejected') console.error(`error: worker ${w}: ${r.reason && r.reason.stack}`)
  })
  const status = failed.length ? 'FAIL' : 'OK'
  console.log(`pg_check ${status}: workers=${WORKERS} iterations=${ITERATIONS} ` +
    `failed_workers=${failed.length} elapsed=${((Date.now() - start) / 1000).toFixed(1)}s`)
  process.exit(failed.length ? 1 : 0)
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
