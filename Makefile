PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: evidence-peers evidence-weighting evidence-fedftg evidence-directions demo test bench evidence evidence-comm lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedkd simulate scenarios/quickstart.yaml

test: $(STAMP)
	$(BIN)/ruff check fedkd strategies tests benchmarks examples
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

lint: $(STAMP)
	$(BIN)/ruff check fedkd strategies tests benchmarks examples

clean:
	rm -rf $(VENV) runs

# Algorithm and heterogeneous-model comparisons on non-IID Fashion-MNIST (README "Results";
# the weighting study is `make evidence-weighting`); about 1.5 hours on 2 cores.
EVIDENCE_SET := --set data.params.train_limit=20000 --set data.params.test_limit=5000 --set rounds=15
HETERO_SET := --set data.params.train_limit=20000 --set data.params.test_limit=1000 \
	--set rounds=10 --set eval_every=5
HETERO := --set 'clients.models=[{arch: cnn_small, fraction: 0.5}, {arch: mlp, fraction: 0.25}, {arch: cnn_medium, fraction: 0.25}]'

comma := ,

# copy a study's report and plots into docs/results/<study>/ (what README shows)
publish = mkdir -p docs/results/$(1) && cp runs/evidence/$(1)/report.md runs/evidence/$(1)/*.png docs/results/$(1)/

evidence: $(STAMP)
	$(BIN)/fedkd sweep scenarios/noniid_fashion.yaml $(EVIDENCE_SET) --seeds 0,1 \
		--grid strategy.name=fedavg,feddf,fedgen,fedftg,fml --out runs/evidence/algorithms
	$(BIN)/fedkd report runs/evidence/algorithms --baseline name=fedavg
	$(call publish,algorithms)
	$(BIN)/fedkd sweep scenarios/noniid_fashion.yaml $(HETERO_SET) $(HETERO) --seeds 0,1 \
		--grid strategy.name=local,fedmd,dml --out runs/evidence/heterogeneous
	$(BIN)/fedkd report runs/evidence/heterogeneous --baseline name=local
	$(call publish,heterogeneous)

# FedFTG's two synthesis loops (dense, fedftg) against FedAvg with a BatchNorm model (the
# BN-statistics prior needs one): non-IID Fashion-MNIST scaled down, 3 seeds (README
# "Results"). On 2 cores the fedftg loop takes ~9 min a run; add
# --set strategy.params.device=cuda where a GPU is free.
FTG_SET := --set data.params.train_limit=6000 --set data.params.test_limit=2000 \
	--set rounds=10 --set clients.models.0.arch=cnn_medium --seeds 0,1,2 --parallel 2

evidence-fedftg: $(STAMP)
	$(BIN)/fedkd sweep scenarios/noniid_fashion.yaml $(FTG_SET) \
		--grid strategy.name=fedavg --out runs/evidence/fedftg
	$(BIN)/fedkd sweep scenarios/noniid_fashion.yaml $(FTG_SET) --set strategy.name=fedftg \
		--grid strategy.params.mode=dense,fedftg --out runs/evidence/fedftg-modes
	$(BIN)/fedkd report runs/evidence/fedftg runs/evidence/fedftg-modes --baseline name=fedavg
	$(call publish,fedftg)

# Does fedkd reproduce each paper's direction? Every algorithm on non-IID Fashion-MNIST
# scaled to 2 cores (6,000 images, 10 rounds, cnn_small), 3 seeds (README "Results").
DIRECTIONS := fedavg,fedntd,fedgkd,feddf,fedgen,fml,local,fd,fedproto,dsfl,dml

evidence-directions: $(STAMP)
	$(BIN)/fedkd sweep scenarios/noniid_fashion.yaml --set data.params.train_limit=6000 \
		--set data.params.test_limit=2000 --set rounds=10 --seeds 0,1,2 --parallel 2 \
		--grid strategy.name=$(DIRECTIONS) --out runs/evidence/directions
	$(BIN)/fedkd report runs/evidence/directions --baseline name=fedavg
	$(call publish,directions)

# The multi-teacher weighting study: every weighting x {FedDF, FedMD, FedGen, DML} x 3 seeds on
# non-IID Fashion-MNIST scaled to 2 cores (6,000 images, 10 rounds, mlp), the same budget per
# configuration, with a separate 5 % labeled weighting split for every run (so label-using
# weightings get no extra data over the others) and the oracle as the ceiling; teacher
# diagnostics and a paired comparison against uniform per algorithm (README "Results").
# About 25 minutes on 2 cores.
STUDY_SET := --set data.params.train_limit=6000 --set data.params.test_limit=2000 \
	--set rounds=10 --set clients.models.0.arch=mlp --set data.weight_fraction=0.05 \
	--set engine.name=inline --set engine.threads=1 --set server.threads=1 \
	--seeds 0,1,2 --parallel 2
W_ANY := uniform,data_size,class_counts,confidence,entropy,agreement,variance,oracle
W_LABELED := validation,learned,per_class_validation
# sweep one algorithm over its weightings, report against uniform, publish
study = $(BIN)/fedkd sweep scenarios/noniid_fashion.yaml $(STUDY_SET) --set strategy.name=$(1) \
	$(2) --grid strategy.params.weighting=$(3) --out runs/evidence/weighting-$(1) && \
	$(BIN)/fedkd report runs/evidence/weighting-$(1) --baseline weighting=uniform && \
	mkdir -p docs/results/weighting-$(1) && \
	cp runs/evidence/weighting-$(1)/*.md runs/evidence/weighting-$(1)/*.png docs/results/weighting-$(1)/

evidence-weighting: $(STAMP)
	$(call study,feddf,,$(W_ANY)$(comma)$(W_LABELED)$(comma)certainty)
	$(call study,fedmd,,$(W_ANY)$(comma)$(W_LABELED)$(comma)kt_pfl)
	$(call study,dml,,$(W_ANY)$(comma)$(W_LABELED)$(comma)kt_pfl)
	$(call study,fedgen,--set strategy.params.label_weighting=false,$(W_ANY))

# Accuracy per MB under codecs and a tight budget, and deadlines on heterogeneous devices
# (non-IID Fashion-MNIST scaled to 2 cores; README "Results"); about 15 minutes on 2 cores.
COMM_SET := --set data.params.train_limit=10000 --set data.params.test_limit=2000 \
	--set rounds=10 --set clients.models.0.arch=mlp
COMM_GRID := --grid strategy.name=fedavg,feddf,fedmd,dml --seeds 0,1,2 --parallel 2
DEVICES := --set 'clients.devices.profiles=[{name: phone, fraction: 0.6, gflops: 2, up_mbps: 5, down_mbps: 20, availability: 0.7}, {name: laptop, fraction: 0.4, gflops: 20, up_mbps: 50, down_mbps: 100, availability: 0.95}]'

evidence-comm: $(STAMP)
	for c in fp32 fp16 int8 topk; do \
		d=$$c; [ $$c = topk ] && d=fp32; \
		$(BIN)/fedkd sweep scenarios/noniid_fashion.yaml $(COMM_SET) $(COMM_GRID) \
			--set comm.down.codec=$$d --set comm.up.codec=$$c --out runs/evidence/comm-$$c && \
		$(BIN)/fedkd report runs/evidence/comm-$$c --baseline name=fedavg && \
		mkdir -p docs/results/comm-$$c && \
		cp runs/evidence/comm-$$c/report.md runs/evidence/comm-$$c/*.png docs/results/comm-$$c/ \
		|| exit 1; \
	done
	$(BIN)/fedkd sweep scenarios/noniid_fashion.yaml $(COMM_SET) $(COMM_GRID) \
		--set comm.budget.total_mb=20 --out runs/evidence/comm-budget
	$(BIN)/fedkd report runs/evidence/comm-budget --baseline name=fedavg
	$(call publish,comm-budget)
	$(BIN)/fedkd sweep scenarios/noniid_fashion.yaml $(COMM_SET) $(DEVICES) --seeds 0,1,2 \
		--grid clients.deadline_s=0.3,0.8,1000 --parallel 2 --out runs/evidence/deadline
	$(BIN)/fedkd report runs/evidence/deadline --baseline deadline_s=1000
	$(call publish,deadline)

# Decentralized peers on graphs: peer_kd vs dpsgd on ring, small-world, complete and random
# matching, 20 peers all active, 3 seeds, and training alone (`local`) as the floor
# (non-IID Fashion-MNIST scaled to 2 cores: 6,000 images, mlp, 30 rounds); accuracy and
# consensus vs rounds and vs MB over the graph's edges (README "Results"). About 10 minutes
# on 2 cores.
PEERS_SET := --set data.params.train_limit=6000 --set data.params.test_limit=2000 \
	--set clients.models.0.arch=mlp --set clients.fraction=1.0 \
	--set engine.name=inline --set engine.threads=1 --set server.threads=1 \
	--seeds 0,1,2 --parallel 2
TOPOLOGIES := ring,small_world,complete,random_matching

evidence-peers: $(STAMP)
	$(BIN)/fedkd sweep scenarios/noniid_fashion.yaml $(PEERS_SET) \
		--grid strategy.name=peer_kd,dpsgd --grid strategy.params.topology.name=$(TOPOLOGIES) \
		--out runs/evidence/peers
	$(BIN)/fedkd sweep scenarios/noniid_fashion.yaml $(PEERS_SET) --grid strategy.name=local \
		--out runs/evidence/peers/alone
	$(BIN)/fedkd report runs/evidence/peers \
		--baseline strategy.name=dpsgd,strategy.params.topology.name=complete
	$(call publish,peers)
	cp runs/evidence/peers/*.md docs/results/peers/
