"""Networks under workspace modes: layers, LayerWorkspaceMgr, MultiLayerNetwork, models."""

from jaxws.nn.checks import LabelCheck
from jaxws.nn.conf import NeuralNetConfiguration
from jaxws.nn.listeners import StepLoss
from jaxws.nn.layers import LSTM
from jaxws.nn.layers import BaseOutputLayer
from jaxws.nn.layers import BatchNormalization
from jaxws.nn.layers import Dense
from jaxws.nn.layers import Dropout
from jaxws.nn.layers import Layer
from jaxws.nn.layers import OutputLayer
from jaxws.nn.layers import RnnOutputLayer
from jaxws.nn.listeners import CollectScoresListener
from jaxws.nn.listeners import ScoreIterationListener
from jaxws.nn.listeners import TrainingListener
from jaxws.nn.functional import FunctionalModel
from jaxws.nn.model import Model
from jaxws.nn.model import TrainState
from jaxws.nn.modes import WorkspaceMode
from jaxws.nn.network import MultiLayerNetwork
from jaxws.nn.workspace_mgr import ArrayType
from jaxws.nn.workspace_mgr import LayerWorkspaceMgr

__all__ = [
    "ArrayType",
    "BaseOutputLayer",
    "BatchNormalization",
    "CollectScoresListener",
    "Dense",
    "Dropout",
    "FunctionalModel",
    "LabelCheck",
    "LSTM",
    "Layer",
    "LayerWorkspaceMgr",
    "Model",
    "MultiLayerNetwork",
    "NeuralNetConfiguration",
    "OutputLayer",
    "RnnOutputLayer",
    "ScoreIterationListener",
    "StepLoss",
    "TrainState",
    "TrainingListener",
    "WorkspaceMode",
]
