r"""FedAffect (Shome & Kar): federated SimCLR representation learning + federated few-shot
relation network (Algorithm 1), evaluated by 1-shot episodes on held-out clients.

Embedded default (synthetic faces, clients = subjects, the last subjects held out; about 9
minutes on 2 CPU cores; ends by printing 1-shot, 5-shot and overall accuracy on unseen subjects
vs chance):
  python -m fer_jax.main --config=configs/fedaffect.py --workdir=/tmp/fedaffect
Smoke test (seconds of training):
  python -m fer_jax.main --config=configs/fedaffect.py:runlocal --workdir=/tmp/fa_small
CK+48, clients = subjects, few-shot test on the unseen subjects of fold 0:
  python -m fer_jax.main --config=configs/fedaffect.py:data=ckplus48 --workdir=/tmp/fa_ck
Encoder ablation on CK+ (SimCLR encoder vs random encoder vs centralized):
  ... :data=ckplus48,representation=none   ... :data=ckplus48,mode=centralized
FER-2013 in 5 random clients (the paper's Table 2), PrivateTest as the held-out pool:
  python -m fer_jax.main --config=configs/fedaffect.py:data=fer2013 --workdir=/tmp/fa_fer
FER-2013 at 10% labels, SimCLR encoder vs random encoder (5 seeds: overall 0.358 vs 0.278, every
seed ahead; with --config.fed.rounds=40 few-shot rounds, seed 0: 0.405 vs 0.359;
docs/results.md#fedaffect-fer2013-simclr30-5seeds): 30 SimCLR rounds (45 min on 2
cores; measured as the first 30 rounds of a 40-round run, no schedule depends on the total),
then the few-shot rounds from its encoder (7 min per seed; the random arm leaves out the init
flags):
  python -m fer_jax.main --config=configs/fedaffect.py:data=fer2013 --workdir=/tmp/fa_simclr \
      --config.fed.rounds=30 --config.fedaffect.encoder_sharing=handoff \
      --config.fewshot.episodes_per_round=1 --config.fedaffect.queries_per_class=1
  python -m fer_jax.main --config=configs/fedaffect.py:data=fer2013,representation=none \
      --workdir=/tmp/fa_simclr_s0 --config.seed=0 --config.init.path=/tmp/fa_simclr \
      --config.init.src=rep/encoder --config.init.dst=rep/encoder
FER-2013's best measured recipe (1-shot 0.440, 5-shot 0.526, overall 0.547; 41 min on 2 cores;
docs/results.md#fedaffect-fer2013-4stage): the project's four-stage classifier with GroupNorm,
frozen here (model=small_cnn_4stage: its layout, the last pool left out):
  python -m fer_jax.main --config=configs/supervised.py:data=fer2013 --workdir=/tmp/enc4 \
      --config.model.kwargs.norm=group --config.train.num_epochs=16
(without num_epochs=16 the encoder trains its default 34 epochs, 86 min on 2 cores, to 0.657:
1-shot 0.475, 5-shot 0.573, overall 0.598; docs/results.md#fedaffect-fer2013-4stage-34ep)
  python -m fer_jax.main --workdir=/tmp/fa_fer4 \
      --config=configs/fedaffect.py:data=fer2013,representation=none,model=small_cnn_4stage \
      --config.fedaffect.train_encoder=False \
      --config.fedaffect.labeled_fraction=1.0 --config.init.path=/tmp/enc4 \
      --config.init.dst=rep/encoder --config.init.skip='dense|head'
Paper scale (ResNet-50 V2 encoder at 96x96x3, every client every round; for accelerators):
  python -m fer_jax.main --config=configs/fedaffect.py:data=ckplus48,paper --workdir=DIR \
      --config.fed.layout=fixed --config.fed.unroll=False --config.fed.vmap_width=8 \
      --config.fed.clients_per_call=8

FERG-DB, leave one character out (the paper's Table 1): prepare it with that character as the
test split, then train on the other five (one client each) and test on the one left out:
  python -m fer_jax.main --config=configs/prepare.py:kind=ferg,path=/data/FERG_DB_256 \
      --config.steps=split,normalize,resize --config.resize.size=48 --config.resize.channels=1 \
      --config.split.mode=subject --config.split.test_subjects=mery --workdir=/tmp/ferg_mery
  python -m fer_jax.main --config=configs/fedaffect.py:data=prepared \
      --config.data.manual_dir=/tmp/ferg_mery --workdir=/tmp/fa_ferg_mery
(any prepared dataset works; without subject ids its training split is cut into
fed.num_clients random clients).

Algorithm 1 as written (relation MSE, per-round encoder hand-off, 8-image episodes of 7
supports + 1 query), to report next to the defaults:
  python -m fer_jax.main --config=configs/fedaffect.py:paper_protocol --workdir=/tmp/fa_paper

Arguments: runlocal, paper, paper_protocol, data=synthetic|ckplus48|fer2013|prepared,
mode=federated|centralized, representation=simclr|none,
model=small_cnn|small_cnn_4stage|resnet18|resnet50v2.

The few-shot learner's options (issue 16: Algorithm 1 as written does not learn on real faces;
the relation module collapses to a constant score). Defaults = what learned best where measured
(embedded default 1-shot 0.21 -> 0.39; CK+48 fold 0, 3 seeds, 0.78 -> 0.88; FER-2013, 10%
labels, 20 rounds of 16 episodes per client, 12-16 min: 1-shot 0.175 random encoder, 0.21-0.22
from a SimCLR encoder in 2 seeds of 3, docs/results.md#fedaffect-fer2013-fewshot);
`paper_protocol` = Algorithm 1 as written:
  option                        default             paper_protocol
  fewshot.loss                  ce                  mse   (relation MSE, Sung et al. Eq. 2)
  fewshot.head                  relation            relation   (prototypical: Snell et al.
                                                               2017, a baseline arm, loss ce)
  fedaffect.encoder_sharing     shared              handoff   (shared: the few-shot encoder is
                                                    handed back after the few-shot round)
  fedaffect.queries_per_class   15 (Sung et al.;    0 (fedaffect.queries = 1 per episode)
                                clipped to what the
                                clients hold)
  model.relation_hidden_activation  relu            relu   (FER-2013: leaky_relu, measured)
Backend knobs as configs/fedavg.py: fed.layout (auto: the engine picks the layout; for conv
nets on CPU one client and one local step per call), fed.steps_per_call (0 = the layout's
choice; FER-2013 uses 8: WORKSPACE.md#engine-knobs); with fed.layout=fixed, clients_per_call,
vmap_width and unroll as set.
"""

import ml_collections

from configs import common

_ENCODERS = {
    # norm='group' (GroupNorm, per example): clients pad partial batches and BatchNorm would mix
    # padding into its statistics. With norm='none' (encoder and relation module) the relation
    # scores went constant, 1-shot accuracy at chance (docs/papers.md#fedaffect-groupnorm).
    # The CPU encoder: ~33 MFLOP per 48x48 image forward (one conv at full resolution).
    # pool_last (a key here so it can be overridden): False leaves the last stage unpooled, for
    # deeper encoders (four stages give a 3x3 map that the relation module would pool to 1x1;
    # docs/results.md#fedaffect-fer2013-4stage).
    "small_cnn": dict(norm="group", widths=(16, 32, 64), convs_per_stage=(1, 2, 2),
                      pool_last=True),
    # The project's four-stage FER-2013 classifier with GroupNorm (configs/supervised.py's
    # small_cnn with --config.model.kwargs.norm=group): FER-2013's best measured encoder when
    # pre-trained there and frozen here (docs/results.md#fedaffect-fer2013-4stage).
    "small_cnn_4stage": dict(norm="group", widths=(24, 48, 96, 192),
                             convs_per_stage=(1, 2, 2, 1), pool_last=False),
    "resnet18": dict(norm="group", stem="small"),
    "resnet50v2": dict(norm="group", stem="small"),
}


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, paper=False, paper_protocol=False,
                           data="synthetic", mode="federated", representation="simclr",
                           model="small_cnn")
    if arg.paper:
        arg.model = "resnet50v2"
    if arg.model not in _ENCODERS:
        raise ValueError(f"config argument model={arg.model!r}; expected one of "
                         f"{sorted(_ENCODERS)}")
    config = ml_collections.ConfigDict()
    config.experiment = "fedaffect"
    # federated | centralized (the same two methods and budget on the pooled data)
    config.mode = arg.mode
    config.seed = 0
    config.data = common.data_config(arg.data, runlocal=arg.runlocal)
    config.data.val_split = ""
    config.data.eval_split = "test"
    if arg.data == "synthetic":
        config.data.synthetic.num_subjects = 12 if arg.runlocal else 48
        config.data.synthetic.test_subjects = 4 if arg.runlocal else 12
        config.data.synthetic.images_per_class = 4 if arg.runlocal else 10
    small = arg.model.startswith("small_cnn")
    if not small:
        config.data.image_size, config.data.channels = 96, 3

    config.model = ml_collections.ConfigDict()
    config.model.name = "small_cnn" if small else arg.model
    config.model.kwargs = ml_collections.ConfigDict(_ENCODERS[arg.model])
    if arg.runlocal and small:
        stages = len(config.model.kwargs.widths)
        config.model.kwargs.widths = (8, 16, 32, 64)[:stages]
    elif arg.runlocal:
        config.model.kwargs.width = 8  # ResNet's first stage; runlocal is a smoke test.
    config.model.projector_hidden = 256
    config.model.projector_out = 128
    config.model.relation_features = 64  # Sung et al. 2018.
    config.model.relation_hidden = 8
    config.model.relation_norm = "group"  # group | none: GroupNorm after each conv block
    # relu (Sung et al.) | leaky_relu (the FER-2013 default): the 8-unit hidden layer's
    # activation; with ReLU all 8 units died in one FER-2013 seed of six (constant scores from
    # round 1).
    config.model.relation_hidden_activation = "relu"
    # The model is {rep: encoder + projector, few: encoder + relation module}: dst='rep/encoder'
    # starts the encoder both learners use (the few-shot one is handed it every round);
    # path '' = random init (WORKSPACE.md#init).
    config.init = common.init_config()

    fa = config.fedaffect = ml_collections.ConfigDict()
    fa.representation = arg.representation  # simclr | none (random encoder, no SimCLR rounds)
    fa.labeled_fraction = 0.5  # share of each client's images that carry labels
    fa.unlabeled = "rest"  # rest: the unlabeled share only | all: every image, labels dropped
    fa.shots = 1  # K
    # Queries of a training episode: Q_c per class (class-balanced; Sung et al. train with 15)
    # when queries_per_class > 0, clipped to pool // C - K (>= 1) for a pool of the largest
    # client's labeled images (the pool is raised to C (K + Q_c) where clients hold that many);
    # queries_per_class = 0: `queries` per episode drawn uniformly (FedAffect's 8-image episodes,
    # 7 supports + 1 query when C = 7, are queries = 1). The effective sizes go to
    # partition.json and eval.json ('episode').
    fa.queries_per_class = 15
    fa.queries = 1
    # Encoder of the two learners: handoff = Algorithm 1 read literally (the aggregated SimCLR
    # encoder overwrites the few-shot embedding module every round, discarding what
    # LocalFewShot taught it); shared = also hand the aggregated few-shot encoder back after the
    # few-shot round: one encoder updated by both local procedures in turn
    # (docs/papers.md#fedaffect-handoff).
    fa.encoder_sharing = "shared"
    fa.eval_shots = (1, 5)  # episode accuracies reported (plus the overall accuracy)
    fa.pool_size = 64  # labeled images per few-shot local step from which the episode is drawn
    # LocalFewShot trains f and g jointly (False: f frozen there). Set False for an encoder from
    # a supervised run: on CK+48 freezing it gave +9.3 points overall (9 of 10 folds); freezing
    # SimCLR's encoder gave -3.5 (5 folds; docs/results.md#fedaffect-ckplus48-3-seeds-frozen).
    fa.train_encoder = True
    fa.eval_episodes = 500  # >= 500 episodes on held-out clients (mean and 95% interval)
    # The learning curve's held-out points: every curve_every_rounds rounds (0 = only the final
    # evaluation), K-shot accuracy over the same curve_episodes episodes each time.
    fa.curve_every_rounds = 10
    fa.curve_episodes = 100
    fa.num_heldout_clients = 0  # > 0: the eval split cut into this many random held-out clients
    # within_client: supports and queries from one held-out client; cross_client: supports from
    # one, queries from the next (CK+48's default: a subject's images of one class are frames of
    # one sequence, near-duplicates, so within-client queries copy their support).
    fa.eval_protocol = "within_client"
    fa.plot_points = 600  # images in the 2-D embedding plot

    rep = config.repr = ml_collections.ConfigDict()
    rep.batch_size = 32  # M
    rep.temperature = 0.5  # tau
    rep.local_epochs = 1  # E1
    rep.learning_rate = 3e-3  # client Adam
    rep.cohort_size = 8
    rep.augment = ml_collections.ConfigDict(dict(
        crop_scale=(0.3, 1.0), crop_ratio=(0.75, 1.3333333), flip=0.5, jitter_prob=0.8,
        brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, grayscale_prob=0.2,
        blur_prob=0.5, blur_sigma=(0.1, 1.0), blur_kernel_frac=0.1))

    few = config.fewshot = ml_collections.ConfigDict()
    few.episodes_per_round = 4  # local steps (episodes) per client per round
    # ce: softmax cross-entropy of each query over its episode's C relation outputs (pre-sigmoid
    # logits); mse: the paper's per-pair relation MSE (collapsed to a constant score on FER-2013)
    few.loss = "ce"
    few.head = "relation"  # relation (FedAffect) | prototypical (Snell et al. 2017; loss ce)
    few.learning_rate = 3e-3  # client Adam
    few.cohort_size = 8

    # The engine's server and layout knobs; batch sizes, local steps, cohorts and client
    # learning rates are the `repr` and `fewshot` blocks'.
    fed = config.fed = common.fed_config(
        arg.data, keep=("partition", "num_clients", "rounds", "server_optimizer",
                        "server_learning_rate", "clients_per_call", "vmap_width", "unroll",
                        "steps_per_call", "num_devices", "layout"))
    # auto (prepared): by subject when the prepared images carry subject ids, else iid.
    fed.partition = {"synthetic": "subject", "ckplus48": "subject", "prepared": "auto"}.get(
        arg.data, "iid")
    fed.num_clients = 5  # iid only (FER-2013 in 5 random clients, the paper's Table 2)
    fed.rounds = 40

    config.eval_batch_size = 256
    config.checkpoint_every_rounds = 10

    if arg.data == "synthetic":
        # 40 unlabeled images per subject: one minibatch of M = 40 (80 views), two epochs;
        # 40 labeled images (5 per class): episodes of 8 supports + 4 queries per class
        # (queries_per_class clipped); with queries_per_class = 0, 16 queries per episode.
        rep.batch_size, rep.local_epochs = 40, 2
        fa.queries = 16
        few.episodes_per_round = 8
        # fed.rounds stays 40: with one device per core (fer_jax.main's default for federated
        # runs) 40 rounds give 1-shot 0.433 +- 0.010 / 0.429 +- 0.010 (seeds 0 / 1) in 5.5 min
        # on 2 quiet cores, 9 min beside another training run (30 rounds: 0.389 +- 0.008;
        # docs/results.md#fedaffect-default-40-rounds).
    if arg.data == "ckplus48":
        # CK+ subjects hold ~8 images: every image is labeled and also used unlabeled (as the
        # paper uses FERG's images for both learners).
        fa.labeled_fraction, fa.unlabeled = 1.0, "all"
        fa.eval_protocol = "cross_client"
        rep.batch_size = 16
        rep.cohort_size, few.cohort_size = 16, 16
        fed.rounds = 60
    if arg.data == "fer2013":
        fa.labeled_fraction, fa.unlabeled = 0.1, "rest"
        fa.pool_size = 256
        fa.num_heldout_clients = 7
        rep.cohort_size, few.cohort_size = 5, 5
        rep.batch_size = 64
        few.episodes_per_round = 16
        fed.rounds = 20
        # ~5,200 unlabeled images per client = 81 SimCLR steps of 64: unrolled in one program
        # they did not compile on CPU (17 GB after 11 min); with 8 steps per call round 1,
        # compilation included, took 185 s at 2.3 GB RSS (docs/results.md#fedaffect-results).
        # Few-shot rounds: 17.5 s with 8 per call vs 22.0 s with the automatic layout's 1
        # (docs/results.md#engine-auto-layout-2026-12-03).
        fed.steps_per_call = 8
        # With ReLU all 8 hidden units of the relation module died in one seed of six; the leaky
        # head was ahead in every seed of the random-encoder arm (1-shot +2.1, 5-shot +3.6,
        # overall +4.0 points, 3 seeds; docs/results.md#fedaffect-fer2013-leaky).
        config.model.relation_hidden_activation = "leaky_relu"
    if arg.paper:
        rep.batch_size, rep.local_epochs = 128, 2
        few.episodes_per_round = 32
        fed.rounds = 200
        rep.cohort_size = few.cohort_size = 1_000_000  # every client every round
    if arg.paper_protocol:
        # Algorithm 1 as written: relation MSE, the per-round hand-off, 1-shot episodes with a
        # single query (8 images when C = 7).
        few.loss, few.head = "mse", "relation"
        fa.encoder_sharing = "handoff"
        fa.shots, fa.queries, fa.queries_per_class = 1, 1, 0
        config.model.relation_hidden_activation = "relu"  # Sung et al.'s relation module
    if arg.runlocal:
        fed.rounds = 3
        rep.cohort_size = few.cohort_size = 3
        rep.batch_size, rep.local_epochs = 16, 1
        few.episodes_per_round = 2
        fa.eval_episodes = 40
        fa.plot_points = 100
        config.model.projector_hidden, config.model.projector_out = 32, 16
        config.model.relation_features = 16
        config.checkpoint_every_rounds = 2
    return config


def get_sweep(arg=None):
    """The encoder ablation: SimCLR encoder vs random encoder vs centralized (seeds and folds
    from launch/sweep.py's --seeds / --folds)."""
    del arg
    return [{"name": "simclr", "mode": "federated", "fedaffect.representation": "simclr"},
            {"name": "random", "mode": "federated", "fedaffect.representation": "none"},
            {"name": "centralized", "mode": "centralized", "fedaffect.representation": "simclr"}]
