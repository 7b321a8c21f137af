// Node's cluster, the classic example: the primary forks one worker per
// CPU (or $BENCH_WORKERS) and each worker calls http.createServer().listen().
// Scheduling is Node's default (SCHED_RR on Linux) unless the environment
// sets NODE_CLUSTER_SCHED_POLICY=none.  With BENCH_WORKERS=0 there is no
// cluster: this one process serves (the baseline of Node's scaling ratios).
//
// Same surface as benchmarks/app.tac: $BENCH_HTTP_PORT answers "hello\n"
// with an X-Worker: <pid> header (GET /cpu first computes
// $BENCH_CPU_ITERATIONS rounds of PBKDF2-SHA256, the same work as app.tac),
// $BENCH_FLOOD_PORT closes every connection at once.  Each serving process
// counts the connections it got; GET /stats on $BENCH_STATS_PORT returns
// them (the primary asks every worker over the cluster IPC channel, so it
// costs nothing while the load runs).  "ready" is printed once every
// serving process listens on both ports.
'use strict';
const cluster = require('cluster');
const crypto = require('crypto');
const http = require('http');
const net = require('net');
const os = require('os');

const HTTP_PORT = Number(process.env.BENCH_HTTP_PORT || 8080);
const FLOOD_PORT = Number(process.env.BENCH_FLOOD_PORT || 8081);
const STATS_PORT = Number(process.env.BENCH_STATS_PORT || 8082);
const WORKERS = Number(process.env.BENCH_WORKERS || os.availableParallelism());
const CPU_ITERATIONS = Number(process.env.BENCH_CPU_ITERATIONS || 2000);
const HOST = '127.0.0.1';

// Serve both ports in this process; onListening is called once per port.
function serve(onListening) {
  const counts = { pid: process.pid, http: 0, flood: 0, open: 0, requests: 0 };
  const pid = String(process.pid);

  const server = http.createServer((req, res) => {
    counts.requests += 1;
    const answer = () => {
      res.setHeader('Content-Type', 'text/plain');
      res.setHeader('X-Worker', pid);
      res.end('hello\n');
    };
    if (req.url.startsWith('/cpu')) {
      crypto.pbkdf2Sync('txcluster', 'benchmark', CPU_ITERATIONS, 32, 'sha256');
      answer();
    } else if (req.url.startsWith('/slow')) setTimeout(answer, 50 + Math.random() * 150);
    else answer();
  });
  server.on('connection', (socket) => {
    counts.http += 1;
    counts.open += 1;
    socket.on('close', () => { counts.open -= 1; });
  });
  server.listen(HTTP_PORT, HOST, onListening);

  net.createServer((socket) => {
    counts.flood += 1;
    socket.destroy();
  }).listen(FLOOD_PORT, HOST, onListening);
  return counts;
}

// GET /stats answers with collect(done)'s list of counts.
function serveStats(collect) {
  http.createServer((req, res) => {
    collect((answers) => {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(answers));
    });
  }).listen(STATS_PORT, HOST);
}

function askWorkers() {
  let nextQuery = 0;
  return (done) => {
    const id = ++nextQuery;
    const workers = Object.values(cluster.workers);
    const answers = [];
    const timer = setTimeout(() => done(answers), 2000);
    for (const w of workers) {
      const onMessage = (msg) => {
        if (!msg || msg.stats !== id) return;
        w.removeListener('message', onMessage);
        answers.push(msg.counts);
        if (answers.length === workers.length) {
          clearTimeout(timer);
          done(answers);
        }
      };
      w.on('message', onMessage);
      w.send({ query: id });
    }
  };
}

if (WORKERS === 0) {
  let listening = 0;
  const counts = serve(() => {
    listening += 1;
    if (listening === 2) console.log('ready');
  });
  serveStats((done) => done([counts]));
  const stop = () => process.exit(0);
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else if (cluster.isPrimary) {
  let listening = 0;
  for (let i = 0; i < WORKERS; i++) cluster.fork();
  cluster.on('listening', () => {
    listening += 1;
    if (listening === 2 * WORKERS) console.log('ready');
  });
  cluster.on('exit', (worker, code, signal) => {
    console.log(`worker ${worker.process.pid} exited (${signal || code})`);
  });
  serveStats(askWorkers());

  const stop = () => {
    for (const w of Object.values(cluster.workers)) w.kill('SIGTERM');
    setTimeout(() => process.exit(0), 200).unref();
    cluster.on('exit', () => {
      if (Object.keys(cluster.workers).length === 0) process.exit(0);
    });
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  const counts = serve(() => {});
  process.on('message', (msg) => {
    if (msg && msg.query) process.send({ stats: msg.query, counts });
  });
}
