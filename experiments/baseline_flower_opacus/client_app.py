"""Baseline ClientApp (Message API): a fresh PrivacyEngine per round, default hooks, a DataLoader.

σ is planned each round by ``make_private_with_epsilon`` for the whole run (rounds × local epochs),
as a user following the Opacus tutorials would; each round's engine starts its accountant from zero,
so the ε it reports is one round's, not the run's (fedcrm keeps a durable ledger instead).
"""

from __future__ import annotations

import logging
import warnings

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from opacus import PrivacyEngine
from torch.utils.data import DataLoader

from baseline_flower_opacus.task import Net, Settings, get_weights, load_data, test, train

warnings.filterwarnings("ignore", category=UserWarning)
logging.getLogger("opacus").setLevel(logging.ERROR)

app = ClientApp()


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    settings = Settings.from_env()
    trainset, _ = load_data(int(context.node_config["partition-id"]), settings)
    model = Net(trainset.tensors[0].shape[1], settings.hidden)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    loader = DataLoader(trainset, batch_size=settings.batch_size, shuffle=True)
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=settings.target_epsilon,
        target_delta=settings.delta,
        epochs=settings.rounds * settings.local_epochs,
        max_grad_norm=settings.clipping_norm,
    )
    loss = train(model, loader, optimizer, settings.local_epochs)
    metrics = {
        "num-examples": len(trainset),
        "train-loss": loss,
        "epsilon-this-round": engine.get_epsilon(settings.delta),
    }
    content = RecordDict({"arrays": ArrayRecord(get_weights(model)), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    settings = Settings.from_env()
    _, testset = load_data(int(context.node_config["partition-id"]), settings)
    model = Net(testset.tensors[0].shape[1], settings.hidden)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, accuracy, auc = test(model, DataLoader(testset, batch_size=1024))
    metrics = {"num-examples": len(testset), "log-loss": loss, "accuracy": accuracy, "auc": auc}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
