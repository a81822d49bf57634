"""Networks under workspace modes: layers, LayerWorkspaceMgr, MultiLayerNetwork, models."""

from jaxws.nn.checks import LabelCheck
from jaxws.nn.checkpoint_listener import Checkpoint
from jaxws.nn.checkpoint_listener import CheckpointListener
from jaxws.nn.checkpoints import read_meta
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
from jaxws.nn.graph import ComputationGraph
from jaxws.nn.graph_conf import ComputationGraphConfiguration
from jaxws.nn.graph_conf import GraphBuilder
from jaxws.nn.graph_conf import InputType
from jaxws.nn.vertices import DuplicateToTimeSeriesVertex
from jaxws.nn.vertices import ElementWiseVertex
from jaxws.nn.vertices import GraphVertex
from jaxws.nn.vertices import L2Vertex
from jaxws.nn.vertices import LastTimeStepVertex
from jaxws.nn.vertices import MergeVertex
from jaxws.nn.vertices import Preprocessor
from jaxws.nn.vertices import PreprocessorVertex
from jaxws.nn.vertices import ReshapePreprocessor
from jaxws.nn.vertices import ScaleVertex
from jaxws.nn.vertices import ShiftVertex
from jaxws.nn.vertices import StackVertex
from jaxws.nn.vertices import SubsetVertex
from jaxws.nn.vertices import UnstackVertex
from jaxws.nn.workspace_mgr import ArrayType
from jaxws.nn.workspace_mgr import LayerWorkspaceMgr
from jaxws.nn.updaters import AMSGrad
from jaxws.nn.updaters import AdaDelta
from jaxws.nn.updaters import AdaGrad
from jaxws.nn.updaters import AdaMax
from jaxws.nn.updaters import Adam
from jaxws.nn.updaters import ExponentialSchedule
from jaxws.nn.updaters import InverseSchedule
from jaxws.nn.updaters import MapSchedule
from jaxws.nn.updaters import Nadam
from jaxws.nn.updaters import Nesterovs
from jaxws.nn.updaters import PolySchedule
from jaxws.nn.updaters import RmsProp
from jaxws.nn.updaters import Schedule
from jaxws.nn.updaters import Sgd
from jaxws.nn.updaters import SigmoidSchedule
from jaxws.nn.updaters import StepSchedule
from jaxws.nn.updaters import Updater
from jaxws.nn.updaters import updater_from_dict

__all__ = [
    "AMSGrad",
    "AdaDelta",
    "AdaGrad",
    "AdaMax",
    "Adam",
    "ArrayType",
    "BaseOutputLayer",
    "BatchNormalization",
    "Checkpoint",
    "CheckpointListener",
    "CollectScoresListener",
    "ComputationGraph",
    "ComputationGraphConfiguration",
    "Dense",
    "Dropout",
    "DuplicateToTimeSeriesVertex",
    "ElementWiseVertex",
    "ExponentialSchedule",
    "FunctionalModel",
    "GraphBuilder",
    "GraphVertex",
    "InputType",
    "InverseSchedule",
    "L2Vertex",
    "LSTM",
    "LabelCheck",
    "LastTimeStepVertex",
    "Layer",
    "LayerWorkspaceMgr",
    "MapSchedule",
    "MergeVertex",
    "Model",
    "MultiLayerNetwork",
    "Nadam",
    "Nesterovs",
    "NeuralNetConfiguration",
    "OutputLayer",
    "PolySchedule",
    "Preprocessor",
    "PreprocessorVertex",
    "ReshapePreprocessor",
    "RmsProp",
    "RnnOutputLayer",
    "ScaleVertex",
    "Schedule",
    "ScoreIterationListener",
    "Sgd",
    "ShiftVertex",
    "SigmoidSchedule",
    "StackVertex",
    "StepLoss",
    "StepSchedule",
    "SubsetVertex",
    "TrainState",
    "TrainingListener",
    "UnstackVertex",
    "Updater",
    "WorkspaceMode",
    "read_meta",
    "updater_from_dict",
]
