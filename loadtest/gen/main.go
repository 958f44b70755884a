// Command gen is load.py's open-loop offer: it sends commands at a fixed rate, whatever the
// replies do, and times each reply.
//
// load.py sets up the ledger (database, topics, workers, funded wallets) and runs this program for
// the offer itself, because the generator must not be the limit of what it measures: in Python a
// command costs the generator 25 to 40 µs of CPU (aiokafka or librdkafka underneath, measured on
// this machine), more than the worker's own share. franz-go, a Kafka client in Go, takes a few.
//
// The mix is load.py's: charges, holds (a reserve, then a capture or a release once the reserve is
// answered) and retries (a command sent again under its id, with a fresh correlation id). Each
// record goes to its key's partition by Kafka's default partitioner (murmur2, as franz-go's
// StickyKeyPartitioner places keyed records); the worker refuses a record placed elsewhere, and
// those refusals would show in "statuses". One JSON object on stdout at the end.
package main

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"runtime/pprof"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

const (
	amountMax   = 1_000
	historyMax  = 10_000
	captureRate = 0.8 // of the holds opened; the others are released
	secretEnv   = "FLOORGUARD_GEN_SECRET"
	fetchWait   = 10 * time.Millisecond // the longest a reply fetch waits for its bytes (the least franz-go allows)
)

// pace is how the generator trades its own CPU against the latency it adds to what it measures.
type pace struct {
	tick          time.Duration // the offer's schedule: each tick sends the commands whose time has come
	linger        time.Duration // what the producer gathers into one request
	replyMinBytes int32         // what a reply fetch waits for (up to fetchWait) before it returns
	stages        bool          // time each command's acknowledgement (a callback and a lock per record)
}

var (
	// Batched: cheap per command (a throughput run, where the generator must not be the limit),
	// at the price of up to 5 ms before a command leaves and up to 10 ms before its reply is read.
	batched = pace{tick: 5 * time.Millisecond, linger: 5 * time.Millisecond, replyMinBytes: 1 << 20}
	// Eager: each command leaves when its time comes and each reply is read as it lands, as an
	// agent sends and waits for one (a latency run); several times the CPU per command at low rates.
	eager = pace{tick: time.Millisecond, linger: 0, replyMinBytes: 1, stages: true}
)

type options struct {
	brokers, commands, replies string
	rate, seconds, wallets     int
	distribution               string
	holdShare, retryShare      float64
	seed                       int64
	keyID, secret              string
	drainTimeout               time.Duration
	pace                       pace
}

// command is one to send: its wallet, its value and, on a reserve, its id (the hold's name).
type command struct {
	wallet  int
	value   []byte
	reserve string
}

// send is a record sent: its correlation id is its index among the sends, in decimal.
type send struct {
	at       int64 // ns since the start
	wallet   int32
	answered bool
	reserve  string // a reserve's id, on a reserve or its retry: its reply opens the hold to close
	acked    int64  // ns since the start: when the broker acknowledged it (0: not yet)
}

type generator struct {
	opts     options
	producer *kgo.Client
	wallets  [][]byte
	replyTo  []byte
	start    time.Time

	mu         sync.Mutex
	sends      []send
	unanswered int
	failed     error // the first record the broker refused
	onRefused  func(*kgo.Record, error)

	// Owned by the reader.
	latenciesUs []int64
	stagesUs    [3][]int64         // per reply: sent → acknowledged, acknowledged → reply produced, reply produced → read
	timeline    map[int64][2]int64 // second -> replies, sum of latencies (µs)
	statuses    map[int]int
	closeRng    *rand.Rand
}

func main() {
	var o options
	flag.StringVar(&o.brokers, "brokers", "127.0.0.1:29092", "bootstrap servers, comma separated")
	flag.StringVar(&o.commands, "commands", "", "commands topic")
	flag.StringVar(&o.replies, "replies", "", "reply topic")
	flag.IntVar(&o.rate, "rate", 5_000, "commands offered per second")
	flag.IntVar(&o.seconds, "seconds", 20, "length of the offer")
	flag.IntVar(&o.wallets, "wallets", 10_000, "wallets w0..w(n-1), opened and funded already")
	flag.StringVar(&o.distribution, "distribution", "zipf", "uniform, zipf or hot")
	flag.Float64Var(&o.holdShare, "hold-share", 0.05, "share of reserves (then capture or release)")
	flag.Float64Var(&o.retryShare, "retry-share", 0.05, "share of commands sent again")
	flag.Int64Var(&o.seed, "seed", 1, "random seed")
	flag.StringVar(&o.keyID, "key-id", "", "sign every command with this key, its secret in "+secretEnv)
	flag.DurationVar(&o.drainTimeout, "drain-timeout", 120*time.Second, "how long to wait for the last replies")
	profile := flag.String("cpuprofile", "", "write a CPU profile (pprof) of the run here")
	eagerly := flag.Bool("eager", false, "send each command when its time comes and read each reply as it lands (a latency run)")
	flag.Parse()
	o.pace = batched
	if *eagerly {
		o.pace = eager
	}
	if *profile != "" {
		f, err := os.Create(*profile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "gen:", err)
			os.Exit(1)
		}
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	o.secret = os.Getenv(secretEnv)
	if o.commands == "" || o.replies == "" {
		fmt.Fprintln(os.Stderr, "gen: -commands and -replies are required")
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "gen:", err)
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}

func run(o options) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	brokers := strings.Split(o.brokers, ",")
	producer, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.ProducerLinger(o.pace.linger), kgo.RecordPartitioner(kgo.StickyKeyPartitioner(nil)),
		kgo.MaxBufferedRecords(1_000_000), kgo.ProducerBatchCompression(kgo.NoCompression()))
	if err != nil {
		return err
	}
	defer producer.Close()
	ends, err := kadm.NewClient(producer).ListEndOffsets(ctx, o.replies)
	if err != nil {
		return fmt.Errorf("reply topic's end offsets: %w", err)
	}
	if err := ends.Error(); err != nil {
		return fmt.Errorf("reply topic's end offsets: %w", err)
	}
	at := map[int32]kgo.Offset{}
	ends.Each(func(end kadm.ListedOffset) { at[end.Partition] = kgo.NewOffset().At(end.Offset) })
	consumer, err := kgo.NewClient(kgo.SeedBrokers(brokers...),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{o.replies: at}), kgo.FetchMaxWait(fetchWait), kgo.FetchMinBytes(o.pace.replyMinBytes))
	if err != nil {
		return err
	}
	defer consumer.Close()

	g := &generator{opts: o, producer: producer, replyTo: []byte(o.replies), timeline: map[int64][2]int64{}, statuses: map[int]int{},
		closeRng: rand.New(rand.NewSource(o.seed + 1))}
	g.onRefused = g.refused
	for i := 0; i < o.wallets; i++ {
		g.wallets = append(g.wallets, []byte("w"+strconv.Itoa(i)))
	}
	var before syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &before)
	g.start = time.Now()
	read := make(chan error, 1)
	go func() { read <- g.read(ctx, consumer) }()
	count := g.offer(rand.New(rand.NewSource(o.seed)))
	offered := time.Since(g.start)
	deadline := time.Now().Add(o.drainTimeout)
	for g.waiting() && time.Now().Before(deadline) {
		time.Sleep(o.pace.tick)
	}
	answered := time.Since(g.start)
	var after syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &after)
	cancel()
	<-read
	if err := producer.Flush(context.Background()); err != nil {
		return err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.failed != nil {
		return fmt.Errorf("a command was not produced: %w", g.failed)
	}
	return json.NewEncoder(os.Stdout).Encode(g.report(count, offered, answered, cpuSeconds(after)-cpuSeconds(before)))
}

// offer sends, each tick, the commands whose time has come; returns how many it sent.
func (g *generator) offer(rng *rand.Rand) int {
	o := g.opts
	choose := picker(o.distribution, o.wallets, rng)
	history := make([]command, 0, historyMax)
	count := 0
	var due []command
	for {
		elapsed := time.Since(g.start)
		if elapsed >= time.Duration(o.seconds)*time.Second {
			return count
		}
		due = due[:0]
		for n := int(elapsed.Seconds()*float64(o.rate)) - count; n > 0; n-- {
			count++
			kind := rng.Float64()
			if kind < o.retryShare && len(history) > 0 {
				due = append(due, history[rng.Intn(len(history))]) // the same command again, its own correlation id
				continue
			}
			c := command{wallet: choose()}
			if kind < o.retryShare+o.holdShare {
				c.reserve = "r" + strconv.Itoa(count)
				c.value = g.value("reserve", c.reserve, c.wallet, "", 1+rng.Intn(amountMax))
			} else {
				c.value = g.value("charge", "c"+strconv.Itoa(count), c.wallet, "", 1+rng.Intn(amountMax))
			}
			due = append(due, c)
			if len(history) < historyMax {
				history = append(history, c)
			}
		}
		g.send(due, elapsed.Nanoseconds())
		time.Sleep(o.pace.tick)
	}
}

// value is a command's JSON; hold and amount are left out when empty (and -1).
func (g *generator) value(op, id string, wallet int, hold string, amount int) []byte {
	out := make([]byte, 0, 128)
	out = append(out, `{"v":1,"op":"`...)
	out = append(out, op...)
	out = append(out, `","id":"`...)
	out = append(out, id...)
	out = append(out, `","wallet":"`...)
	out = append(out, g.wallets[wallet]...)
	out = append(out, '"')
	if hold != "" {
		out = append(out, `,"hold":"`...)
		out = append(out, hold...)
		out = append(out, '"')
	}
	if amount >= 0 {
		out = append(out, `,"amount":`...)
		out = strconv.AppendInt(out, int64(amount), 10)
	}
	return append(out, '}')
}

// send produces commands, stamped `now`.
func (g *generator) send(commands []command, now int64) {
	if len(commands) == 0 {
		return
	}
	g.mu.Lock()
	first := g.register(commands, now)
	g.mu.Unlock()
	g.produce(commands, first)
}

// register counts commands as sent and awaiting their reply (g.mu held); the index of the first.
func (g *generator) register(commands []command, now int64) int {
	first := len(g.sends)
	for _, c := range commands {
		g.sends = append(g.sends, send{at: now, wallet: int32(c.wallet), reserve: c.reserve})
	}
	g.unanswered += len(commands)
	return first
}

// produce hands registered commands to the producer, the first one's index being `first`.
func (g *generator) produce(commands []command, first int) {
	for i, c := range commands {
		headers := []kgo.RecordHeader{{Key: "reply_to", Value: g.replyTo},
			{Key: "correlation_id", Value: strconv.AppendInt(nil, int64(first+i), 10)}}
		if g.opts.keyID != "" {
			mac := hmac.New(sha256.New, []byte(g.opts.secret))
			mac.Write(c.value)
			headers = append(headers, kgo.RecordHeader{Key: "auth", Value: []byte(g.opts.keyID + "." + hex.EncodeToString(mac.Sum(nil)))})
		}
		record := &kgo.Record{Topic: g.opts.commands, Key: g.wallets[c.wallet], Value: c.value, Headers: headers}
		if !g.opts.pace.stages {
			g.producer.Produce(context.Background(), record, g.onRefused)
			continue
		}
		index := first + i
		g.producer.Produce(context.Background(), record, func(_ *kgo.Record, err error) { g.produced(index, err) })
	}
}

// refused keeps the first record the broker refused (a batched offer times no stages).
func (g *generator) refused(_ *kgo.Record, err error) {
	if err != nil {
		g.mu.Lock()
		if g.failed == nil {
			g.failed = err
		}
		g.mu.Unlock()
	}
}

func (g *generator) produced(index int, err error) {
	now := time.Since(g.start).Nanoseconds()
	g.mu.Lock()
	defer g.mu.Unlock()
	if err != nil && g.failed == nil {
		g.failed = err
	}
	g.sends[index].acked = now
}

// waiting: some send is unanswered, or a reserve's reply may still send its capture or release.
func (g *generator) waiting() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.unanswered > 0 && g.failed == nil
}

type reply struct {
	OK        bool   `json:"ok"`
	Duplicate bool   `json:"duplicate"`
	Hold      string `json:"hold"`
	Amount    int    `json:"amount"`
}

// read times each reply, from its send to its arrival; a reserve's reply closes its hold.
func (g *generator) read(ctx context.Context, consumer *kgo.Client) error {
	for {
		fetches := consumer.PollFetches(ctx)
		if ctx.Err() != nil {
			return nil
		}
		fetches.EachError(func(topic string, partition int32, err error) {
			fmt.Fprintf(os.Stderr, "gen: reading %s/%d: %v\n", topic, partition, err)
		})
		now := time.Since(g.start).Nanoseconds()
		var closing []command
		g.mu.Lock()
		fetches.EachRecord(func(r *kgo.Record) {
			index := -1
			for _, h := range r.Headers {
				if h.Key == "correlation_id" {
					index = decimal(h.Value)
					break
				}
			}
			if index < 0 || index >= len(g.sends) || g.sends[index].answered {
				return // answered already (a reply published again), or not this run's
			}
			sent := &g.sends[index]
			sent.answered = true
			g.unanswered--
			latency := max((now-sent.at)/1_000, 1)
			g.latenciesUs = append(g.latenciesUs, latency)
			if sent.acked > 0 { // where the time went; the reply's timestamp is when the worker produced it (ms)
				produced := r.Timestamp.Sub(g.start).Nanoseconds()
				g.stagesUs[0] = append(g.stagesUs[0], (sent.acked-sent.at)/1_000)
				g.stagesUs[1] = append(g.stagesUs[1], (produced-sent.acked)/1_000)
				g.stagesUs[2] = append(g.stagesUs[2], (now-produced)/1_000)
			}
			second := g.timeline[now/1_000_000_000]
			g.timeline[now/1_000_000_000] = [2]int64{second[0] + 1, second[1] + latency}
			g.statuses[status(r.Value)]++
			if sent.reserve == "" {
				return
			}
			var answer reply // only a reserve's reply is decoded: the hold it opened is what comes next
			if json.Unmarshal(r.Value, &answer) == nil && answer.OK && !answer.Duplicate {
				closing = append(closing, g.closing(int(sent.wallet), sent.reserve, answer))
			}
		})
		// Registered before the lock is let go: the reserve just answered must not leave the
		// count of unanswered sends at zero while its capture or release is not counted yet.
		first := g.register(closing, now)
		g.mu.Unlock()
		g.produce(closing, first)
	}
}

// status is a reply's "status", read without decoding the whole reply (0 when it is not found).
func status(reply []byte) int {
	const field = `"status":`
	at := bytes.Index(reply, []byte(field))
	if at < 0 {
		return 0
	}
	n := 0
	for _, c := range reply[at+len(field):] {
		if c < '0' || c > '9' {
			break
		}
		n = n*10 + int(c-'0')
	}
	return n
}

// closing is the capture (of part of the hold, or all of it) or the release that ends a hold.
func (g *generator) closing(wallet int, reserve string, answer reply) command {
	if g.closeRng.Float64() < captureRate {
		return command{wallet: wallet, value: g.value("capture", "c-"+reserve, wallet, answer.Hold, g.closeRng.Intn(answer.Amount+1))}
	}
	return command{wallet: wallet, value: g.value("release", "r-"+reserve, wallet, answer.Hold, -1)}
}

// decimal is the non-negative integer a correlation id spells, or -1.
func decimal(text []byte) int {
	if len(text) == 0 || len(text) > 12 {
		return -1
	}
	n := 0
	for _, c := range text {
		if c < '0' || c > '9' {
			return -1
		}
		n = n*10 + int(c-'0')
	}
	return n
}

func picker(distribution string, wallets int, rng *rand.Rand) func() int {
	switch distribution {
	case "hot":
		return func() int { return 0 }
	case "uniform":
		return func() int { return rng.Intn(wallets) }
	}
	weights := make([]float64, wallets) // Zipf, exponent 1.0: cumulative weights
	total := 0.0
	for rank := range weights {
		total += 1 / float64(rank+1)
		weights[rank] = total
	}
	return func() int { return min(sort.SearchFloat64s(weights, rng.Float64()*total), wallets-1) }
}

func cpuSeconds(usage syscall.Rusage) float64 {
	return float64(usage.Utime.Nano()+usage.Stime.Nano()) / 1e9
}

// quantiles of latencies in µs, in ms.
func quantiles(latenciesUs []int64, qs map[string]float64) map[string]float64 {
	sorted := slices.Clone(latenciesUs)
	slices.Sort(sorted)
	out := map[string]float64{}
	for name, q := range qs {
		if len(sorted) > 0 {
			out[name] = float64(sorted[min(int(q*float64(len(sorted))), len(sorted)-1)]) / 1_000
		}
	}
	return out
}

func (g *generator) report(count int, offered, answered time.Duration, cpu float64) map[string]any {
	seconds := make([]int64, 0, len(g.timeline))
	for second := range g.timeline {
		seconds = append(seconds, second)
	}
	slices.Sort(seconds)
	timeline := [][3]float64{}
	for _, second := range seconds {
		entry := g.timeline[second]
		timeline = append(timeline, [3]float64{float64(second), float64(entry[0]), float64(entry[1]) / float64(entry[0]) / 1_000})
	}
	statuses := map[string]int{}
	for status, n := range g.statuses {
		statuses[strconv.Itoa(status)] = n
	}
	return map[string]any{
		"sent": count, "answered": len(g.latenciesUs), "offered_s": offered.Seconds(), "answered_s": answered.Seconds(),
		"latency_ms": quantiles(g.latenciesUs, map[string]float64{"p50": 0.50, "p99": 0.99, "p999": 0.999, "max": 1}),
		// The reply's timestamp has ms resolution, and the worker's clock is this machine's.
		"stages_ms": map[string]any{
			"command_acknowledged": quantiles(g.stagesUs[0], map[string]float64{"p50": 0.50, "p99": 0.99}),
			"reply_produced":       quantiles(g.stagesUs[1], map[string]float64{"p50": 0.50, "p99": 0.99}),
			"reply_read":           quantiles(g.stagesUs[2], map[string]float64{"p50": 0.50, "p99": 0.99}),
		},
		"timeline": timeline, "sends_without_reply": g.unanswered, "cpu_s": cpu, "statuses": statuses,
	}
}
